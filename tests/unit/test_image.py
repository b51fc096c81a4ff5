import shutil
from pathlib import Path

from legion.sandbox import image


def test_tag_follows_the_runner_source(tmp_path: Path) -> None:
    src = tmp_path / "sandbox_image"
    shutil.copytree(image.source_dir(), src, ignore=shutil.ignore_patterns("__pycache__"))
    before = image.content_hash(src)
    assert before == image.content_hash(image.source_dir())
    (src / "legion_runner" / "__pycache__").mkdir(exist_ok=True)
    (src / "legion_runner" / "__pycache__" / "x.pyc").write_bytes(b"noise")
    assert image.content_hash(src) == before  # caches do not count
    runner = src / "legion_runner" / "runner.py"
    runner.write_text(runner.read_text() + "\n# changed\n")
    assert image.content_hash(src) != before
    assert image.image_tag().startswith("legion-sandbox:")
