"""What an adapter file holds: layout, base family, modules, ranks, alphas, parameter count, size,
dtype, metadata, and whether its `sshs_model_hash` still matches its tensors (a textual-inversion
embedding's report: inspect_embedding.py)."""

from __future__ import annotations

import collections
import hashlib
import os
import re
from pathlib import Path
from typing import Mapping

from .adapter import Adapter, read_adapter_for
from .bundle import describe, read_bundle

_LONG = 160  # metadata values longer than this are shortened in the text report (not in JSON)


# Attention projections: diffusers (0.42) reads a kohya file's alpha for these only when it is their
# component's most common alpha (other layers, LoCon's convs included, keep their own).
_ATTENTION = re.compile(r"(\.to_[qkv]|\.to_out\.0|self_attn\.[qkv]_proj|self_attn\.out_proj)$")


def _kind(module) -> str:
    if not module.is_conv:
        return "linear"
    kh, kw = module.down.shape[2:]
    return f"conv {kh}x{kw}"


def misread_attention_alphas(alphas: Mapping[str, float]) -> tuple[float, list[str]]:
    """(the most common alpha, the attention modules with another one) of one component's
    {module path: alpha}: the modules whose alpha diffusers (0.42) misreads in a kohya file."""
    if not alphas:
        return 0.0, []
    common = collections.Counter(alphas.values()).most_common(1)[0][0]
    return common, sorted(p for p, a in alphas.items() if _ATTENTION.search(p) and a != common)


def _is_conv_kxk(module) -> bool:
    """A conv with a kernel larger than 1x1: what LoCon (kohya's conv_dim) adapts at its own rank."""
    return module.is_conv and tuple(module.down.shape[2:]) != (1, 1)


def _tensor_hash(path: Path) -> str:
    """SHA-256 of the bytes after the header: the tensors alone, as `sshs_model_hash` is defined."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _counts(values) -> dict[str, int]:
    return {str(v): n for v, n in sorted(collections.Counter(values).items())}


def kohya_load_quirks(adapter: Adapter) -> list[str]:
    """What diffusers' (0.42) own loader gets wrong in this kohya-layout adapter, one line each
    (empty for other layouts). `infer.py` works around them; plain diffusers users should convert."""
    out = []
    if adapter.layout != "kohya":
        return out
    for component, modules in adapter.modules.items():
        common, odd = misread_attention_alphas({p: m.alpha for p, m in modules.items()})
        if odd:
            out.append(f"{component}: {len(odd)} attention module(s) have an alpha other than the most common "
                       f"({common:g}), e.g. {odd[0]}: diffusers (0.42) applies it wrongly to kohya files; "
                       "convert to the diffusers layout for diffusers, or resize/merge to one alpha")
        attention = [p for p in modules if re.search(r"self_attn\.[qkv]_proj$", p)]
        if attention and not any(p.endswith("self_attn.out_proj") for p in modules):
            # diffusers tells old-style kohya text-encoder keys apart by `to_out_lora`; without one it
            # drops q/k/v modules (or fails) when loading.
            out.append(f"{component} has q/k/v modules but no out_proj: diffusers (0.42) cannot load them from "
                       "a kohya file; convert to the diffusers layout for diffusers")
    return out


def _blocks(module) -> str | None:
    """OFT's blocks as `n×b`, BOFT's as `m×n×b` (stages × blocks × block size)."""
    blocks = module.parts.get("oft_blocks", module.parts.get("oft_diag"))
    return None if blocks is None else "×".join(str(d) for d in blocks.shape[:-1])


def lycoris_summary(adapter) -> dict:
    """What `inspect` reports for a LyCORIS file: types, ranks, alphas (OFT/BOFT: constraints),
    block shapes and counts per component."""
    modules = [(c, p, m) for c, p, m in adapter.items()]
    rotations = {"OFT", "BOFT"}
    ranks = collections.Counter(m.rank for _, _, m in modules if m.rank is not None)
    alphas = collections.Counter(m.alpha for _, _, m in modules if m.alpha is not None and m.kind not in rotations)
    constraints = collections.Counter(m.alpha or 0.0 for _, _, m in modules if m.kind in rotations)
    blocks = collections.Counter(_blocks(m) for _, _, m in modules if m.kind in rotations)
    components = {c: {"modules": len(mods),
                      "types": dict(sorted(collections.Counter(m.kind for m in mods.values()).items())),
                      "parameters": sum(m.parameters for m in mods.values())}
                  for c, mods in adapter.modules.items()}
    return {"types": adapter.kinds, "components": components,
            "ranks": {str(k): n for k, n in sorted(ranks.items())},
            "alphas": {f"{k:g}": n for k, n in sorted(alphas.items())},
            "oft_constraints": {f"{k:g}": n for k, n in sorted(constraints.items())},
            "oft_blocks": dict(sorted(blocks.items())),
            "dora": any(m.dora_scale is not None for _, _, m in modules),
            "cp": sum(1 for _, _, m in modules if {"lora_mid.weight", "hada_t1", "lokr_t2", "bm.weight"} & set(m.parts)),
            "parameters": adapter.parameters,
            "modules": [{"component": c, "module": p, "type": m.kind, "rank": m.rank, "alpha": m.alpha,
                         "blocks": _blocks(m), "out": m.out_features(), "dora": m.dora_scale is not None}
                        for c, p, m in modules]}


def _inspect_lycoris(path: Path, base: str | None) -> dict:
    """The report of a LyCORIS file: its types, ranks and counts (see `export/lycoris.py`)."""
    from .lycoris import read_lycoris

    adapter = read_lycoris(path, base=base)
    dtypes = _counts(str(t.dtype).removeprefix("torch.") for _, _, m in adapter.items()
                     for k, t in m.parts.items() if t.is_floating_point())
    report = {"file": str(path), "size_bytes": path.stat().st_size, "layout": "lycoris", "base": adapter.base,
              "base_from": adapter.base_reason, "dtypes": dtypes, **lycoris_summary(adapter),
              "metadata": dict(sorted(adapter.metadata.items())),
              "warnings": ["diffusers (0.42) load_lora_weights does not read LyCORIS files for SD/SDXL; infer.py "
                           "and `lora-trainer merge` merge them into the base weights"]}
    if "sshs_model_hash" in adapter.metadata:
        report["hash_matches"] = _tensor_hash(path) == adapter.metadata["sshs_model_hash"]
    return _with_embeddings(report, path)


def _with_embeddings(report: dict, path: Path) -> dict:
    """The report with the file's bundled textual-inversion embeddings (token, vectors, widths)."""
    report["embeddings"] = describe(read_bundle(path))
    if report["embeddings"]:
        report["warnings"].append("diffusers' load_lora_weights refuses the bundled embeddings' keys; infer.py reads "
                                  "them, and `convert --to diffusers` writes them beside the file")
    return report


def inspect_adapter(path: str | os.PathLike, base: str | None = None) -> dict:
    """Everything `lora-trainer inspect` shows, as plain JSON-ready values."""
    from .inspect_embedding import inspect_embedding, is_embedding_file
    from .lycoris import needs_lycoris_reader

    path = Path(path)
    if path.is_file() and is_embedding_file(path):
        return inspect_embedding(path)
    if path.is_file() and needs_lycoris_reader(path):
        return _inspect_lycoris(path, base)
    adapter = read_adapter_for(path, base)
    components = {}
    for component, modules in adapter.modules.items():
        kinds = collections.Counter(_kind(m) for m in modules.values())
        components[component] = {"modules": len(modules), "kinds": dict(sorted(kinds.items())),
                                 "parameters": sum(m.parameters for m in modules.values())}
    metadata = adapter.metadata
    report = {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "layout": adapter.layout,
        "base": adapter.base,
        "base_from": adapter.base_reason,
        "dora": adapter.is_dora,
        "dtypes": _counts(str(t.dtype).removeprefix("torch.") for _, _, m in adapter.items() for t in (m.down, m.up)),
        "components": components,
        "ranks": _counts(m.rank for _, _, m in adapter.items()),
        "alphas": _counts(m.alpha for _, _, m in adapter.items()),
        "scales": _counts(round(m.scale, 6) for _, _, m in adapter.items()),
        # LoCon: the rank and alpha of the convs with a kernel > 1x1 (kohya's conv_dim / conv_alpha)
        "conv_ranks": _counts(m.rank for _, _, m in adapter.items() if _is_conv_kxk(m)),
        "conv_alphas": _counts(m.alpha for _, _, m in adapter.items() if _is_conv_kxk(m)),
        "parameters": adapter.parameters,
        "modules": [{"component": c, "module": p, "kind": _kind(m), "rank": m.rank, "alpha": m.alpha,
                     "in": m.weight_shape[1], "out": m.weight_shape[0]} for c, p, m in adapter.items()],
        "metadata": dict(sorted(metadata.items())),
        "warnings": kohya_load_quirks(adapter),
    }
    if "sshs_model_hash" in metadata:
        report["hash_matches"] = _tensor_hash(path) == metadata["sshs_model_hash"]
    return _with_embeddings(report, path)


def _spread(counts: dict[str, int], total: int) -> str:
    if len(counts) == 1:
        return f"{next(iter(counts))} (all {total} modules)"
    return ", ".join(f"{value} ×{n}" for value, n in counts.items())


def _lycoris_lines(report: dict, modules: bool) -> list[str]:
    total = len(report["modules"])
    parts = [f"{name} {info['modules']} ({', '.join(f'{k} {n}' for k, n in info['types'].items())})"
             for name, info in report["components"].items()]
    ranked = sum(report["ranks"].values())
    lines = [
        f"file        {report['file']} ({report['size_bytes'] / 1024:.1f} KiB, {', '.join(report['dtypes'])})",
        f"layout      lycoris (kohya names; LyCORIS types: {', '.join(f'{k} {n}' for k, n in report['types'].items())})",
        f"base        {report['base']} (from {report['base_from']})",
        f"modules     {total}: {'; '.join(parts)}",
    ]
    if ranked:
        lines.append(f"rank        {_spread(report['ranks'], ranked)}" + (
            f"; {total - ranked} without a rank (full, (IA)^3, OFT/BOFT, norm, LoKr of two whole factors)"
            if ranked != total else ""))
    if report["alphas"]:
        lines.append(f"alpha       {_spread(report['alphas'], sum(report['alphas'].values()))}")
    if report["oft_blocks"]:
        rotated = sum(report["oft_blocks"].values())
        lines.append(f"oft blocks  {_spread(report['oft_blocks'], rotated)} (OFT n×b, BOFT stages×n×b); "
                     f"constraint (alpha) {_spread(report['oft_constraints'], rotated)}")
    if report["cp"]:
        lines.append(f"cp          {report['cp']} modules with a CP core (lora_mid / hada_t1,t2 / lokr_t2 / bm)")
    if report["dora"]:
        lines.append(f"dora        {sum(m['dora'] for m in report['modules'])} of the modules have a dora_scale")
    lines.append(f"parameters  {report['parameters']:,}")
    lines += _hash_and_metadata_lines(report, "note")
    if modules:
        lines.append("modules:")
        lines += [f"  {m['component']}.{m['module']}  {m['type']}{' DoRA' if m['dora'] else ''}  out {m['out']}"
                  + (f"  rank {m['rank']}" if m["rank"] is not None else "")
                  + (f"  blocks {m['blocks']}" if m["blocks"] else "")
                  + (f"  alpha {m['alpha']:g}" if m["alpha"] is not None else "") for m in report["modules"]]
    return lines


def _hash_and_metadata_lines(report: dict, warning_label: str) -> list[str]:
    """The bundled embeddings, the hash check, the warnings (under `warning_label`) and the metadata
    of an inspect report."""
    found = report.get("embeddings") or []
    each = [f"{e['token']} ({e['vectors']} vector{'s' if e['vectors'] != 1 else ''}, {e['fits']})" for e in found]
    lines = [f"embeddings  {len(found)} bundled (A1111 uses them by token): {'; '.join(each)}"] if found else []
    if "hash_matches" in report:
        state = "matches the tensors" if report["hash_matches"] else "does NOT match the tensors (file changed after hashing)"
        lines.append(f"hash        sshs_model_hash {report['metadata']['sshs_model_hash'][:12]}... {state}")
    lines += [f"{warning_label:<12}{w}" for w in report["warnings"]]
    ema = report["metadata"].get("ss_ema_decay")
    if ema and ema != "0.0":  # train.ema_decay: worth a line of its own, not only a key among 60
        warmup = " with warm-up" if report["metadata"].get("ss_ema_warmup") == "True" else ""
        lines.append(f"ema         the tensors are an EMA of the trained weights (decay {ema}{warmup})")
    lines.append(f"metadata    {len(report['metadata'])} keys")
    for key, value in report["metadata"].items():
        value = " ".join(value.split())
        lines.append(f"  {key}: {value if len(value) <= _LONG else value[:_LONG] + f'... ({len(value)} chars)'}")
    return lines


def format_report(report: dict, modules: bool = False) -> str:
    """The text `lora-trainer inspect` prints; `modules` lists every module."""
    if report["layout"] == "lycoris":
        return "\n".join(_lycoris_lines(report, modules))
    if report["layout"] == "embedding":
        from .inspect_embedding import format_embedding

        return "\n".join(format_embedding(report))
    total = len(report["modules"])
    parts = []
    for name, info in report["components"].items():
        kinds = ", ".join(f"{n} {k}" for k, n in info["kinds"].items())
        parts.append(f"{name} {info['modules']} ({kinds})")
    lines = [
        f"file        {report['file']} ({report['size_bytes'] / 1024:.1f} KiB, {', '.join(report['dtypes'])})",
        f"layout      {report['layout']}" + (" (DoRA: magnitude per output channel)" if report["dora"] else ""),
        f"base        {report['base']} (from {report['base_from']})",
        f"modules     {total}: {'; '.join(parts)}",
        f"rank        {_spread(report['ranks'], total)}",
        f"alpha       {_spread(report['alphas'], total)}",
        f"scale       {_spread(report['scales'], total)} (alpha / rank)",
    ]
    convs = sum(report["conv_ranks"].values())
    if convs:
        lines.append(f"conv rank   {_spread(report['conv_ranks'], convs)}, alpha {', '.join(report['conv_alphas'])} "
                     "(LoCon: the convs with a kernel over 1x1)")
    lines.append(f"parameters  {report['parameters']:,}")
    lines += _hash_and_metadata_lines(report, "warning")
    if modules:
        lines.append("modules:")
        lines += [f"  {m['component']}.{m['module']}  {m['kind']} {m['in']}->{m['out']}  rank {m['rank']}  alpha {m['alpha']:g}"
                  for m in report["modules"]]
    return "\n".join(lines)
