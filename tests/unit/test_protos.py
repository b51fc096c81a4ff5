import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gen-protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, f"generated code is stale; run `make protos`:\n{check.stdout}"


def test_runner_and_controller_copies_are_identical() -> None:
    for name in ("sandbox_pb2.py", "sandbox_pb2_grpc.py"):
        controller = (ROOT / "controller/legion/_proto" / name).read_text()
        runner = (ROOT / "sandbox_image/legion_runner/_proto" / name).read_text()
        assert controller == runner
