"""Optimisation profiles from the graph specs: the (min, opt, max) shape of every input, which the
TensorRT build compiles and the TensorRT backend selects per call.

`llm_decode` gets two profiles rather than one wide one: understanding decodes T=1 token over a
growing past, generation feeds T=1+N step tokens over the fixed prompt past. One profile spanning
both would be tuned for neither (TensorRT picks kernels per profile at its `opt` shape), and two
separate engines would hold the LLM weights twice.
"""

from __future__ import annotations

from .manifest import DimRange, SpecRecord

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def _resolve(shape: tuple[int | str, ...], values: dict[str, int]) -> Shape:
    return tuple(d if isinstance(d, int) else sum(values[p.strip()] for p in d.split("+")) for d in shape)


def _profile(spec: SpecRecord, ranges: dict[str, DimRange]) -> Profile:
    out: Profile = {}
    for t in spec.inputs:
        lo, opt, hi = (_resolve(t.shape, {k: getattr(r, w) for k, r in ranges.items()}) for w in ("min", "opt", "max"))
        out[t.name] = (lo, opt, hi)
    return out


def optimization_profiles(name: str, spec: SpecRecord) -> list[Profile]:
    dims = dict(spec.dims)
    if name != "llm_decode":
        return [_profile(spec, dims)]
    t_max, p_max = dims["T"].max, dims["P"].max
    understanding = dict(dims, T=DimRange(1, 1, 1), P=DimRange(0, dims["P"].opt, p_max))
    # Generation: the past is the prompt (>= 1 token, BOS), and past + step tokens fit the sequence.
    gen_past = DimRange(1, min(dims["P"].opt, p_max - t_max), p_max - t_max + 1)
    generation = dict(dims, T=DimRange(t_max, t_max, t_max), P=gen_past)
    return [_profile(spec, understanding), _profile(spec, generation)]


def select_profile(profiles: list[Profile], shapes: dict[str, Shape]) -> int:
    """Index of the first profile whose ranges contain every input shape."""
    for i, profile in enumerate(profiles):
        if all(all(lo <= s <= hi for s, lo, hi in zip(shapes[n], mn, mx)) for n, (mn, _, mx) in profile.items()):
            return i
    raise ValueError(f"no optimisation profile accepts input shapes {shapes}")
