"""The HTTP front end: validates requests, queues jobs, returns results."""
