import json
import os

for l in open(os.environ["OUT"] + "/sweep.jsonl"):
    d = json.loads(l)
    if "check" in d:
        if not d["ok"]: print("BAD", d)
        continue
    if "name" in d:
        errs = [v for v in d["all"].values() if isinstance(v, str)]
        print(f'{d["name"]:17s} t={d["tokens"]:4d} fp16 {d["fp16_us"]:7.1f} dense {d["dense_us"]:7.1f} best {d["best_us"]:7.1f} {d["best_vs_fp16"]:.2f}x (dense {d["dense_vs_fp16"]:.2f}x) auto {d["auto_us"]:7.1f} perm {d["perm_us"]:.1f} epi {d["epi_us"]:.1f} {d["best_cfg"]} errs {len(errs)} {errs[:1]}')
    else:
        print(d)
