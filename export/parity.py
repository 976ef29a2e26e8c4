"""Parity between PyTorch and ONNX Runtime on the same inputs, as a result object that says pass or fail."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OutputParity:
    input: str
    max_abs_error: float
    max_rel_error: float
    argmax_agreement: float

    def passed(self, atol: float, min_agreement: float) -> bool:
        return self.max_abs_error <= atol and self.argmax_agreement >= min_agreement


@dataclass(frozen=True)
class ParityReport:
    results: list[OutputParity]
    atol: float
    min_agreement: float

    @property
    def passed(self) -> bool:
        return all(r.passed(self.atol, self.min_agreement) for r in self.results)

    @property
    def needed_atol(self) -> float:
        """The tolerance that would have been needed for every input to pass."""
        return max(r.max_abs_error for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "min_argmax_agreement": self.min_agreement,
            "needed_atol": self.needed_atol,
            "results": [asdict(r) for r in self.results],
        }

    def table(self) -> str:
        rows = ["| input | max abs error | max rel error | argmax agreement | pass |", "|---|---|---|---|---|"]
        for r in self.results:
            ok = "yes" if r.passed(self.atol, self.min_agreement) else "NO"
            rows.append(
                f"| {r.input} | {r.max_abs_error:.3g} | {r.max_rel_error:.3g} | {r.argmax_agreement:.6f} | {ok} |"
            )
        return "\n".join(rows)


def compare_outputs(name: str, reference: np.ndarray, candidate: np.ndarray) -> OutputParity:
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    rel = diff / np.maximum(np.abs(reference.astype(np.float64)), 1e-6)
    agreement = float(np.mean(np.argmax(reference, axis=1) == np.argmax(candidate, axis=1)))
    return OutputParity(name, float(diff.max()), float(rel.max()), agreement)


def check_parity(module: Any, onnx_path: str, inputs: dict[str, np.ndarray], *, input_name: str = "image",
                 atol: float = 1e-3, min_agreement: float = 0.999) -> ParityReport:
    """Run ``module`` (PyTorch) and the ONNX file (ONNX Runtime, CPU) on each input and compare."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    results = []
    with torch.no_grad():
        for name, x in inputs.items():
            ref = module(torch.from_numpy(x)).numpy()
            (got,) = session.run(None, {input_name: x})
            results.append(compare_outputs(name, ref, got))
    return ParityReport(results, atol, min_agreement)
