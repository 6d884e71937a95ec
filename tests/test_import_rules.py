"""The house rules on imports: models and inference never import training (issue "One way to load a
trained model"); one checkpoint module sits beneath both. Evaluation (ira/eval) sits below training too: the
stages and the recipe call it (validation WER, the recipe's cards), so it importing training would be a loop."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BELOW_TRAINING = [*sorted((ROOT / "ira" / "models").rglob("*.py")), *sorted((ROOT / "ira" / "eval").rglob("*.py")),
                  *(ROOT / "ira" / name for name in ("checkpoint.py", "speaker.py", "listener.py", "inference.py"))]


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at any depth (a function's lazy import counts too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("path", BELOW_TRAINING, ids=lambda p: str(p.relative_to(ROOT)))
def test_models_and_inference_never_import_training(path: Path) -> None:
    offending = [m for m in imported_modules(path) if m == "ira.training" or m.startswith("ira.training.")]
    assert not offending, f"{path.relative_to(ROOT)} imports {offending}; load parts through ira.models.hub"


def test_inference_imports_with_training_blocked() -> None:
    """Importing the speaker, the listener, the pipeline and the loaders works when ira.training cannot
    be imported at all (as in an inference-only install)."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ira.training" or name.startswith("ira.training."):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Block())
import ira.checkpoint, ira.models.hub, ira.speaker, ira.listener, ira.inference
from ira.models.hub import speech_lm_from_checkpoint, adapter_from_checkpoint, style_encoder_from_checkpoint
assert not [m for m in sys.modules if m.startswith("ira.training")]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_blocker_would_notice_an_import_of_training(tmp_path: Path) -> None:
    """The static check sees a lazy import inside a function (the kind that made a loop before)."""
    sample = tmp_path / "sample.py"
    sample.write_text("def load(path):\n    from ira.training.checkpoint import load_checkpoint\n    return path\n")
    assert "ira.training.checkpoint" in imported_modules(sample)
