"""`GET /v1/files/{id}`: images generated with `response_format=url`."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from app.errors import NotFound
from app.schemas import ErrorBody
from app.state import StateDep

router = APIRouter(tags=["files"])


@router.get(
    "/v1/files/{file_id}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorBody}},
    summary="Download a generated image",
)
async def get_file(file_id: str, state: StateDep) -> Response:
    """The PNG; it expires `HEARTH_RESULT_TTL_S` seconds after it was made."""
    content = await state.redis.get(state.dispatcher.keys.file(file_id))
    if content is None:
        raise NotFound(
            f"No file '{file_id}': it never existed or has expired.", code="file_not_found"
        )
    return Response(
        content, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )
