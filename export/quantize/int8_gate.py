"""The INT8 build's own end-to-end gate: `build --int8` never commits INT8 engines that
`jfexport verify --precision int8` would reject on the machine that built them.

The per-graph parity bound (int8_build) catches a broken layer; it cannot see errors that grow over
30 Euler steps or flip a greedy token 40 tokens in. So before the commit, the INT8 engines in
staging run verify's requests and are held to its INT8 bounds, against the fp32 engines of the same
build (each already held to the PyTorch reference at export: latents within 1e-5, identical tokens),
measured once.

When the check fails, the graphs responsible stay fp32 (their INT8 files are not written): each INT8
graph that can move the failing checks (only the LLM's, when only the answers fail) is checked alone,
beside fp32 others, and those failing alone are dropped; the rest are checked together again. If
that still fails (no graph fails alone, but together they do), or every graph fails alone, the build
fails naming the graphs and the checks: nothing is committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jfexport.reference.bundle import ModelBundle

from jfexport.core.errors import UserError
from jfexport.core.graph_contract import UNDERSTANDING_GRAPHS
from jfexport.core.manifest import Limits
from jfexport.tools.verify import NEW_TOKENS, Check, Outputs, compare, measure

from .int8_build import files_runtime

Progress = Callable[[str], None]
STEPS = 30  # verify's defaults: the gate holds the engines to exactly what `jfexport verify` checks
CFG = 2.0
ANSWER_CHECKS = ("greedy token", "logits")  # verify's checks of the answers (the rest check the images)


class Int8GateError(UserError):
    pass


@dataclass
class GateResult:
    kept_fp32: list[str]  # INT8 graphs dropped: they fail the end-to-end check alone
    checks: list[Check]  # the check of the INT8 graphs served (empty when none is left)
    alone: dict[str, list[Check]]  # per INT8 graph, its check alone (only measured after a failure)

    def to_json(self) -> dict:
        def failed(checks: list[Check]) -> list[str]:
            return [c.name for c in checks if not c.ok]

        return {"bounds": "jfexport verify --precision int8", "steps": STEPS, "new_tokens": NEW_TOKENS["int8"],
                "kept_fp32": self.kept_fp32, "ok": not failed(self.checks),
                "checks": {c.name: c.value for c in self.checks if c.name != "precision (as loaded)"},
                "failed_alone": {g: failed(c) for g, c in self.alone.items() if failed(c)}}


def _failed(checks: list[Check]) -> str:
    return ", ".join(f"{c.name} {c.value:.4g} (bound {c.bound})" if isinstance(c.value, float) else
                     f"{c.name} {c.value} (bound {c.bound})" for c in checks if not c.ok)


def end_to_end_gate(bundle: ModelBundle, limits: Limits, fp32_files: dict[str, Path], int8_files: dict[str, Path],
                    progress: Progress = lambda msg: None) -> GateResult:
    """Hold the INT8 graphs `int8_files` (graph -> staged file) to verify's INT8 bounds; see the module doc."""
    new_tokens = NEW_TOKENS["int8"]

    def run(files: dict[str, Path], precision: str) -> Outputs:
        runtime = files_runtime(bundle, limits, files, precision)
        try:
            return measure(runtime, STEPS, CFG, 0, new_tokens)
        finally:
            runtime.close()

    reference = run(fp32_files, "fp32")

    def check(int8: list[str]) -> list[Check]:
        got = run({**fp32_files, **{g: int8_files[g] for g in int8}}, "int8")
        return compare("int8", got, reference, STEPS, new_tokens)

    graphs = list(int8_files)
    checks = check(graphs)
    if all(c.ok for c in checks):
        progress(f"int8: end-to-end check passed ({_summary(checks)})")
        return GateResult([], checks, {})
    # Answers run no generation graph: when only the answer checks fail, only the LLM's graphs are suspects (the
    # final check of the graphs kept in INT8, together, covers everything again).
    suspects = [g for g in graphs if g in UNDERSTANDING_GRAPHS] if {c.name for c in checks if not c.ok} <= \
        {c.name for c in checks if c.name.startswith(ANSWER_CHECKS)} else graphs
    progress(f"int8: end-to-end check failed: {_failed(checks)}; checking {', '.join(suspects)} alone in INT8")
    alone = {g: check([g]) for g in suspects}
    culprits = [g for g in suspects if not all(c.ok for c in alone[g])]
    for g in suspects:
        progress(f"int8: {g} alone in INT8: " + (_failed(alone[g]) if g in culprits else f"passes ({_summary(alone[g])})"))
    rest = [g for g in graphs if g not in culprits]
    if not rest:
        raise Int8GateError(f"int8: every INT8 graph ({', '.join(graphs)}) fails `verify --precision int8` on its own "
                            "against the fp32 engines: no INT8 graph is written; build without --int8")
    if culprits:
        checks = check(rest)
    if not all(c.ok for c in checks):
        raise Int8GateError(f"int8: the INT8 graphs {', '.join(rest)} pass `verify --precision int8` one by one but "
                            f"fail it together ({_failed(checks)}): nothing is written; build without --int8")
    progress(f"int8: kept fp32 (fail the end-to-end check in INT8): {', '.join(culprits)}; "
             f"{', '.join(rest)} in INT8 pass it ({_summary(checks)})")
    return GateResult(culprits, checks, alone)


def _summary(checks: list[Check]) -> str:
    by_name = {c.name: c.value for c in checks}
    agree = next((v for k, v in by_name.items() if k.startswith("greedy token agreement")), None)
    return (f"latent rel RMS {by_name['latent rel RMS']:.2e}, PSNR {by_name['image PSNR (dB)']:.1f} dB, "
            f"greedy agreement {agree:.3f}")
