"""Print a markdown table of all runs in runs.jsonl (config diff vs defaults, final val, tokens, wall)."""
import json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
DEF = dict(d=128, layers=4, heads=4, ctx=64, bs=16, seed=0, data_seed=0, norm="ln", tau=0.4, head_mult=1.0,
           final_norm=0, emb_norm=0, attn_scale=0.0, qk_norm=0, opt="adamw", lr_emb=1.0, wd_emb=0.0,
           lr_hidden=1.0, wd_hidden=0.0, lr_qk=1.0, wd_qk=0.0, lr_head=1.0, wd_head=0.0, lr_norm=1.0, wd_norm=0.0, wd_mode="lr",
           wd_sched=1, eps=1e-8, beta1=0.9, beta2=0.95, lion_b1=0.9, lion_b2=0.99, clip=0.0, loss_scale=1.0,
           sched="cos", warmup=0, min_lr=0.0, eval_every=100, eval_batches=20, diag=1)
SKIP = {"tag", "param", "lr", "steps", "eval_every", "eval_batches", "diag"}
print("| tag | param | lr | other knobs (vs defaults) | steps | tokens | val@end | min attn ent (last) | wall s |")
print("|---|---|---|---|---|---|---|---|---|")
for line in open(os.path.join(HERE, "runs.jsonl")):
    r = json.loads(line); c = r["cfg"]
    diff = " ".join(f"{k}={v}" for k, v in c.items() if k not in SKIP and DEF.get(k, None) != v)
    last = [h for h in r["hist"] if "act" in h]
    ent = min(b.get("attn_ent_norm", 1) for b in last[-1]["act"]["blocks"]) if last else float("nan")
    print(f"| {c['tag']} | {c['param']} | {c['lr']:g} | {diff} | {c['steps']} | {r['tokens']} | {r['final_val']:.4f} | {ent:.2f} | {r['wall']:.0f} |")
