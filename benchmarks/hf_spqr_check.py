"""Our hf-spqr export run by the SpQR authors' CUDA kernel (``spqr_quant``) vs our packed model, on a GPU.

    spqr export PACKED --to hf-spqr --out HF_DIR
    python benchmarks/hf_spqr_check.py PACKED HF_DIR --data-dir ../shared/data --windows 8 --json out.json

Loads ``HF_DIR`` with transformers' SpQR quantizer (``quant_method: "spqr"``, modules ``spqr_quant.QuantizedLinear``)
and ``PACKED`` with ``load_packed``, then compares the logits of one prompt and the perplexity of the first
``--windows`` windows of docs valid and WikiText-2 (seqlen ``--seqlen``) through both.

transformers 5.x cannot load any SpQR checkpoint with spqr_quant 0.2.0 (seen with 5.17.0): it calls
``QuantizedLinear.create_placeholder``, which spqr_quant spells ``create_placehodler``, and its
``replace_with_spqr_linear`` indexes ``model._modules`` by a dotted module name (``KeyError``). When
``from_pretrained`` fails, this script builds the same modules itself (the quantizer's own steps: one
``QuantizedLinear`` per layer over the checkpoint's four tensors, the rest loaded as stored) and says so in the
output, so the check is of the format and the authors' kernel, not of the transformers glue.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from spqr_cli.core.evaluate import evaluate_perplexity
from spqr_cli.runtime.loader import load_packed

SPQR_TENSORS = ("dense_weights", "row_offsets", "col_vals", "in_perm")


def build_by_hand(hf_dir: Path) -> tuple[torch.nn.Module, str]:
    """The model transformers' SpQR quantizer would build, with ``spqr_quant.QuantizedLinear`` modules, on the GPU."""
    from safetensors.torch import load_file
    from spqr_quant import QuantizedLinear
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(hf_dir)
    qc = cfg.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    replaced = []
    for name, mod in list(model.named_modules()):
        if f"{name}.dense_weights" in state:
            t = {k: state.pop(f"{name}.{k}") for k in SPQR_TENSORS}
            model.set_submodule(name, QuantizedLinear(mod.out_features, mod.in_features, qc["bits"], qc["beta1"],
                                                      qc["beta2"], **t))
            replaced.append(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    missing = [m for m in missing if m.rsplit(".", 1)[-1] not in SPQR_TENSORS and "lm_head" not in m]
    if missing or unexpected:
        raise SystemExit(f"{hf_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.cuda().eval(), f"by hand: {len(replaced)} spqr_quant.QuantizedLinear modules"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packed", type=Path)
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--windows", type=int, default=8, help="test windows per dataset (spqr_quant runs one token "
                    "per kernel call, so whole test sets take long)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    import transformers
    from spqr_quant import QuantizedLinear
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "transformers": transformers.__version__}
    if not hasattr(QuantizedLinear, "create_placeholder"):  # the name transformers 5.x calls
        QuantizedLinear.create_placeholder = QuantizedLinear.create_placehodler
    t0 = time.perf_counter()
    try:
        theirs = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float16, device_map="cuda")
        res["loader"] = "transformers from_pretrained"
    except Exception as e:  # any failure of transformers' glue: say which, and build the modules by hand
        res["transformers_error"] = f"{type(e).__name__}: {e}"
        theirs, res["loader"] = build_by_hand(a.hf_dir)
    res["load_s"] = round(time.perf_counter() - t0, 1)
    ours = load_packed(a.packed, device="cuda")
    tok = AutoTokenizer.from_pretrained(a.packed)
    ids = tok("The packed checkpoint stores codes, statistics and outliers.", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        x, y = theirs(ids).logits.float(), ours(ids).logits.float()
    res["logits_rel_diff"] = ((x - y).norm() / y.norm()).item()
    for name, ds in (("docs valid", f"file:{a.data_dir}/docs/valid.txt"), ("wikitext2", "wikitext2")):
        ppl = {who: evaluate_perplexity(m, tok, ds, seqlen=a.seqlen, max_windows=a.windows,
                                        data_dir=a.data_dir).perplexity
               for who, m in (("spqr_quant", theirs), ("spqr_cli", ours))}
        ppl["diff_pct"] = 100 * (ppl["spqr_quant"] / ppl["spqr_cli"] - 1)
        res[name] = ppl
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
