"""Figures and images the code shows come back as PNG artifacts, bounded per
step, described to the model in one line each. (matplotlib itself, in the
``data`` image, is covered by test_environments.py; here the runner's own
path is driven by a PIL-style object, so the default image suffices.)"""

from __future__ import annotations

import pytest

import legion
from legion.sandbox.session import png_size

pytestmark = pytest.mark.docker

# An object that looks like a PIL image to the runner; save() writes a real PNG.
FAKE_IMAGE = r"""
import struct, zlib
def _chunk(kind, data):
    body = kind + data
    return struct.pack('>I', len(data)) + body + struct.pack('>I', zlib.crc32(body))
class Image:
    __module__ = 'PIL.Image'
    mode = 'RGB'
    def __init__(self, width, height):
        self.size = (width, height)
    def save(self, out, format=None):
        w, h = self.size
        rows = b''.join(b'\x00' + bytes([200, 30, 30]) * w for _ in range(h))
        header = struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)
        out.write(b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', header)
                  + _chunk(b'IDAT', zlib.compress(rows)) + _chunk(b'IEND', b''))
"""


async def test_a_trailing_image_is_an_artifact_not_a_repr(sandbox: legion.Sandbox) -> None:
    await sandbox.run(FAKE_IMAGE)
    result = await sandbox.run("Image(3, 2)")
    assert result.error is None, result.error
    assert result.has_value is False and result.value_repr is None
    (artifact,) = result.artifacts
    assert artifact.mime_type == "image/png"
    assert artifact.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert png_size(artifact.data) == (3, 2)
    assert artifact.description == "image 3x2 RGB"
    assert artifact.summary().startswith("[image/png 3x2, ")


async def test_artifacts_are_bounded_per_step(sandbox: legion.Sandbox) -> None:
    await sandbox.run(FAKE_IMAGE)
    result = await sandbox.run(
        "from legion_runner import artifacts\nfor i in range(11):\n"
        "    artifacts.add_image(Image(i + 1, 1))"
    )
    assert result.error is None, result.error
    assert len(result.artifacts) == 8
    assert result.artifacts_dropped == 3
    assert [png_size(a.data) for a in result.artifacts] == [(i + 1, 1) for i in range(8)]
    # The next step starts with none.
    assert (await sandbox.run("1")).artifacts == ()


async def test_the_model_reads_a_line_per_artifact_never_the_bytes(
    runtime: legion.SandboxRuntime,
) -> None:
    from legion.testing import ScriptedModel, action

    class Painter(legion.Agent):
        """Paints."""

    model = ScriptedModel(
        [
            action("eval_and_continue", code=FAKE_IMAGE + "\nImage(4, 5)"),
            action("return", result="painted"),
        ]
    )
    result = await legion.run(Painter, "paint", model=model, runtime=runtime)
    assert result.output == "painted"
    fed = model.requests[1][-1]["content"]
    assert "[image/png 4x5," in fed and "image 4x5 RGB" in fed
    assert "PNG" not in fed.replace("image/png", "")  # no bytes, no repr
