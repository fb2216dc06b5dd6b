from hearth.cli import app

app(prog_name="hearth")
