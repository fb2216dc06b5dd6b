"""Hearth's error envelope: every error renders, whatever it quotes."""

from __future__ import annotations

import orjson

from app.errors import InvalidRequest, NotFound, response_for


def test_an_error_quoting_a_lone_surrogate_still_renders() -> None:
    # Whatever a client sent, quoted back, must not make the answer unencodable.
    error = NotFound("The model 'x\ud800' does not exist.", param="model\udfff")
    response = response_for(error)
    assert response.status_code == 404
    body = orjson.loads(response.body)["error"]
    assert body["message"] == "The model 'x\\ud800' does not exist."
    assert body["param"] == "model\\udfff"


def test_text_that_is_valid_unicode_renders_unchanged() -> None:
    error = InvalidRequest("Invalid 'prompt': «café» 🦊", param="prompt", code="invalid_value")
    body = orjson.loads(response_for(error).body)["error"]
    assert body == {
        "message": "Invalid 'prompt': «café» 🦊",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "invalid_value",
    }
