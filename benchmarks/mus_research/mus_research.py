"""μS vs SP training-parity research (self-contained, CPU, float32).

Small GPT in two parametrizations:
  sp  : nanoGPT-style pre-LN GPT, init N(0, 0.02) (residual out-projections 0.02/sqrt(2L)), untied head.
  mus : unit-scaled μS: every weight N(0,1); embedding multiplier 1, hidden linear 1/sqrt(fan_in),
        LM head 1/fan_in (configurable); Res-Post-LN fixed(tau) residual
        x <- sqrt(1-tau) x + sqrt(tau) LN(f(x)); optional final norm before the head.

Data: /work/shared/data/shakespeare.txt, byte-level. Work boundaries = the line two lines above each
"by William Shakespeare" line (the title line). The last three works (TWELFTH NIGHT, THE TWO GENTLEMEN
OF VERONA, THE WINTER'S TALE) are validation, everything before is training.

Usage: python mus_research.py --param mus --lr 3e-2 --steps 800 --d 128 --ctx 64 ...
Appends one JSON line per run to runs.jsonl next to this file.
"""
import argparse, json, math, os, time
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "..", "shared", "data", "shakespeare.txt")


# ----------------------------------------------------------------------------- data
def load_split(path=DATA, n_val_works=3):
    raw = open(path, "rb").read()
    lines = raw.split(b"\n")
    offs, o = [], 0
    for ln in lines:
        offs.append(o)
        o += len(ln) + 1
    starts = [offs[i - 2] for i, ln in enumerate(lines) if ln.strip() == b"by William Shakespeare"]
    assert len(starts) == 42, len(starts)
    cut = starts[-n_val_works]
    titles = [lines[i - 2].decode() for i, ln in enumerate(lines) if ln.strip() == b"by William Shakespeare"]
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    return data[:cut], data[cut:], titles[-n_val_works:]


class Batches:
    def __init__(self, data, ctx, bs, seed):
        self.data, self.ctx, self.bs = data, ctx, bs
        self.g = torch.Generator().manual_seed(seed)

    def next(self):
        ix = torch.randint(len(self.data) - self.ctx - 1, (self.bs,), generator=self.g)
        x = torch.stack([self.data[i:i + self.ctx] for i in ix])
        y = torch.stack([self.data[i + 1:i + 1 + self.ctx] for i in ix])
        return x, y


# ----------------------------------------------------------------------------- model
class Lin(nn.Module):
    """Linear with a static output multiplier (μS) and a tag for the param group."""

    def __init__(self, fi, fo, std, mult, kind):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fo, fi) * std)
        self.mult, self.kind = mult, kind

    def forward(self, x):
        y = F.linear(x, self.weight)
        return y * self.mult if self.mult != 1.0 else y


class Norm(nn.Module):
    def __init__(self, d, kind, affine=True):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.ones(d)) if affine else None

    def forward(self, x):
        if self.kind == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return x * self.weight if self.weight is not None else x
        return F.layer_norm(x, x.shape[-1:], self.weight, None, 1e-5)


class Block(nn.Module):
    def __init__(self, a, li):
        super().__init__()
        d, L = a.d, a.layers
        self.a, self.nh = a, a.heads
        mus = a.param == "mus"
        std_h = 1.0 if mus else 0.02
        std_o = 1.0 if mus else 0.02 / math.sqrt(2 * L)
        m = lambda fi: (1 / math.sqrt(fi)) if mus else 1.0
        self.qk = Lin(d, 2 * d, std_h, m(d), "qk")  # query+key projection (own LR group "qk")
        self.v = Lin(d, d, std_h, m(d), "hidden")
        self.proj = Lin(d, d, std_o, m(d), "hidden")
        self.fc = Lin(d, 4 * d, std_h, m(d), "hidden")
        self.fc2 = Lin(4 * d, d, std_o, m(4 * d), "hidden")
        self.n1 = Norm(d, a.norm)
        self.n2 = Norm(d, a.norm)
        if mus:
            tau = a.tau
            self.ca, self.cb = math.sqrt(1 - tau), math.sqrt(tau)
        self.stats = {}

    def attn(self, x):
        B, T, D = x.shape
        q, k = self.qk(x).split(D, dim=-1)
        v = self.v(x)
        hd = D // self.nh
        q, k, v = (t.view(B, T, self.nh, hd).transpose(1, 2) for t in (q, k, v))
        if self.a.qk_norm:
            q = F.rms_norm(q, (hd,)); k = F.rms_norm(k, (hd,))
        scale = self.a.attn_scale if self.a.attn_scale > 0 else 1 / math.sqrt(hd)
        if self.a.track:
            att = (q @ k.transpose(-1, -2)) * scale
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            att = att.masked_fill(~mask, float("-inf"))
            p = att.softmax(-1)
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # B,H,T
            # normalised entropy: entropy / log(#visible) for positions >=1
            nvis = torch.arange(1, T + 1, dtype=torch.float)
            self.stats["attn_ent_norm"] = (ent[..., 1:] / nvis[1:].log()).mean().item()
            self.stats["attn_logit_std"] = att.masked_fill(~mask, 0).pow(2).sum().div(mask.sum() * B * self.nh).sqrt().item()
            y = p @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(y)

    def mlp(self, x):
        return self.fc2(F.gelu(self.fc(x)))

    def forward(self, x):
        if self.a.param == "sp":
            x = x + self.attn(self.n1(x))
            x = x + self.mlp(self.n2(x))
        else:
            fa = self.attn(x)
            if self.a.track:
                self.stats["attn_branch_rms"] = fa.pow(2).mean().sqrt().item()
            x = self.ca * x + self.cb * self.n1(fa)
            fm = self.mlp(x)
            if self.a.track:
                self.stats["mlp_branch_rms"] = fm.pow(2).mean().sqrt().item()
            x = self.ca * x + self.cb * self.n2(fm)
        if self.a.track:
            self.stats["resid_rms"] = x.pow(2).mean().sqrt().item()
        return x


class GPT(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        mus = a.param == "mus"
        d = a.d
        es = 1.0 if mus else 0.02
        self.wte = nn.Parameter(torch.randn(256, d) * es)
        self.wpe = nn.Parameter(torch.randn(a.ctx, d) * es)
        self.blocks = nn.ModuleList([Block(a, i) for i in range(a.layers)])
        self.lnf = Norm(d, a.norm) if (not mus or a.final_norm) else None
        self.emb_norm = Norm(d, a.norm) if (mus and a.emb_norm) else None
        head_mult = (a.head_mult / d) if mus else 1.0
        self.head = Lin(d, 256, 1.0 if mus else 0.02, head_mult, "head")
        self.stats = {}

    def forward(self, idx, tgt=None):
        T = idx.shape[1]
        x = self.wte[idx] + self.wpe[:T]
        if self.a.param == "mus":
            x = x * (1 / math.sqrt(2))  # sum of two unit-variance embeddings -> unit variance
            if self.emb_norm is not None:
                x = self.emb_norm(x)
        if self.a.track:
            self.stats["emb_rms"] = x.pow(2).mean().sqrt().item()
        for b in self.blocks:
            x = b(x)
        if self.lnf is not None:
            x = self.lnf(x)
        logits = self.head(x)
        if self.a.track:
            self.stats["logit_std"] = logits.std().item()
        loss = None if tgt is None else F.cross_entropy(logits.view(-1, 256), tgt.view(-1))
        return logits, loss


def param_groups(model):
    """name -> group among: emb, hidden, head, norm."""
    groups = {"emb": [], "hidden": [], "qk": [], "head": [], "norm": []}
    for n, p in model.named_parameters():
        if n in ("wte", "wpe"):
            groups["emb"].append((n, p))
        elif n.startswith("head"):
            groups["head"].append((n, p))
        elif ".qk." in n:
            groups["qk"].append((n, p))
        elif p.dim() == 1:
            groups["norm"].append((n, p))
        else:
            groups["hidden"].append((n, p))
    return groups


# ----------------------------------------------------------------------------- optimizer
class Opt:
    """AdamW / Lion with per-group lr multipliers and two weight-decay conventions:
    wd_mode='lr'  : w <- w (1 - lr * wd)       (torch AdamW convention)
    wd_mode='fixed': w <- w (1 - wd)           (fully decoupled, independent of LR; μS paper)
    The LR schedule multiplies the per-group lr; in 'fixed' mode wd is optionally also scheduled
    (--wd_sched) so that it vanishes together with the LR."""

    def __init__(self, groups, a):
        self.a = a
        self.groups = []
        for g, ps in groups.items():
            if not ps:
                continue
            lr = a.lr * getattr(a, f"lr_{g}")
            wd = getattr(a, f"wd_{g}")
            self.groups.append(dict(name=g, params=[p for _, p in ps], lr=lr, wd=wd))
        self.state = {}
        self.t = 0

    @torch.no_grad()
    def step(self, sched):
        a = self.a
        self.t += 1
        b1, b2 = a.beta1, a.beta2
        stats = {}
        for g in self.groups:
            lr = g["lr"] * sched
            upd2 = w2 = n = 0.0
            small = 0
            cnt = 0
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state.setdefault(p, {})
                gr = p.grad
                if a.opt == "adamw":
                    if not st:
                        st["m"] = torch.zeros_like(p); st["v"] = torch.zeros_like(p)
                    st["m"].lerp_(gr, 1 - b1)
                    st["v"].mul_(b2).addcmul_(gr, gr, value=1 - b2)
                    mh = st["m"] / (1 - b1 ** self.t)
                    vh = st["v"] / (1 - b2 ** self.t)
                    den = vh.sqrt()
                    small += (den < a.eps).sum().item(); cnt += den.numel()
                    u = mh / (den + a.eps)
                else:  # lion
                    if not st:
                        st["m"] = torch.zeros_like(p)
                    u = (st["m"] * a.lion_b1 + gr * (1 - a.lion_b1)).sign()
                    st["m"].lerp_(gr, 1 - a.lion_b2)
                if g["wd"] > 0:
                    f = lr * g["wd"] if a.wd_mode == "lr" else g["wd"] * (sched if a.wd_sched else 1.0)
                    p.mul_(1 - f)
                p.add_(u, alpha=-lr)
                upd2 += (u * lr).pow(2).sum().item(); w2 += p.pow(2).sum().item(); n += p.numel()
            stats[g["name"]] = dict(upd_over_w=math.sqrt(upd2 / max(w2, 1e-30)), w_rms=math.sqrt(w2 / n),
                                    frac_below_eps=(small / cnt if cnt else float("nan")))
        return stats


def schedule(step, a):
    if a.warmup and step < a.warmup:
        return (step + 1) / a.warmup
    if a.sched == "const":
        return 1.0
    prog = (step - a.warmup) / max(1, a.steps - a.warmup)
    if a.sched == "cos":
        return a.min_lr + (1 - a.min_lr) * 0.5 * (1 + math.cos(math.pi * prog))
    if a.sched == "linear":
        return a.min_lr + (1 - a.min_lr) * (1 - prog)
    raise ValueError(a.sched)


@torch.no_grad()
def evaluate(model, val, a, nb):
    model.eval()
    b = Batches(val, a.ctx, a.bs, seed=1234)
    tot = 0.0
    for _ in range(nb):
        x, y = b.next()
        tot += model(x, y)[1].item()
    model.train()
    return tot / nb


def grad_rms(groups):
    out = {}
    for g, ps in groups.items():
        s = n = 0
        for _, p in ps:
            if p.grad is not None:
                s += p.grad.pow(2).sum().item(); n += p.numel()
        if n:
            out[g] = math.sqrt(s / n)
    return out


def main():
    P = argparse.ArgumentParser()
    P.add_argument("--param", choices=["sp", "mus"], default="mus")
    P.add_argument("--tag", default="")
    P.add_argument("--d", type=int, default=128)
    P.add_argument("--layers", type=int, default=4)
    P.add_argument("--heads", type=int, default=4)
    P.add_argument("--ctx", type=int, default=64)
    P.add_argument("--bs", type=int, default=16)
    P.add_argument("--steps", type=int, default=800)
    P.add_argument("--seed", type=int, default=0)
    P.add_argument("--data_seed", type=int, default=0)
    P.add_argument("--norm", choices=["ln", "rms"], default="ln")
    # μS knobs
    P.add_argument("--tau", type=float, default=0.4)
    P.add_argument("--head_mult", type=float, default=1.0, help="head multiplier = head_mult/fan_in")
    P.add_argument("--final_norm", type=int, default=0)
    P.add_argument("--emb_norm", type=int, default=0)
    P.add_argument("--attn_scale", type=float, default=0.0, help="0 -> 1/sqrt(d_head)")
    P.add_argument("--qk_norm", type=int, default=0)
    # optimizer
    P.add_argument("--opt", choices=["adamw", "lion"], default="adamw")
    P.add_argument("--lr", type=float, default=3e-2)
    for g in ("emb", "hidden", "qk", "head", "norm"):
        P.add_argument(f"--lr_{g}", type=float, default=1.0, help="multiplier on --lr")
        P.add_argument(f"--wd_{g}", type=float, default=0.0)
    P.add_argument("--wd_mode", choices=["lr", "fixed"], default="lr")
    P.add_argument("--wd_sched", type=int, default=1)
    P.add_argument("--eps", type=float, default=1e-8)
    P.add_argument("--beta1", type=float, default=0.9)
    P.add_argument("--beta2", type=float, default=0.95)
    P.add_argument("--lion_b1", type=float, default=0.9)
    P.add_argument("--lion_b2", type=float, default=0.99)
    P.add_argument("--clip", type=float, default=0.0)
    P.add_argument("--loss_scale", type=float, default=1.0, help="multiply loss before backward (not undone: only Adam eps sees it)")
    P.add_argument("--sched", choices=["const", "cos", "linear"], default="cos")
    P.add_argument("--warmup", type=int, default=0)
    P.add_argument("--min_lr", type=float, default=0.0)
    P.add_argument("--eval_every", type=int, default=100)
    P.add_argument("--eval_batches", type=int, default=20)
    P.add_argument("--diag", type=int, default=1)
    P.add_argument("--out", default=os.path.join(HERE, "runs.jsonl"))
    a = P.parse_args()
    a.track = False

    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    tr, va, vt = load_split()
    model = GPT(a)
    groups = param_groups(model)
    opt = Opt(groups, a)
    batches = Batches(tr, a.ctx, a.bs, seed=a.data_seed)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"# {a.tag} {vars(a)}\n# params {nparam} train {len(tr)} val {len(va)} ({vt})", flush=True)
    t0 = time.time()
    hist = []
    ema = None
    for step in range(a.steps):
        x, y = batches.next()
        diag_now = a.diag and ((step + 1) % a.eval_every == 0 or step == 0)
        a.track = bool(diag_now)
        _, loss = model(x, y)
        a.track = False
        (loss * a.loss_scale).backward()
        gr = grad_rms(groups) if diag_now else None
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        s = schedule(step, a)
        ost = opt.step(s)
        model.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            vl = evaluate(model, va, a, a.eval_batches)
            rec = dict(step=step + 1, train=ema, val=vl, t=time.time() - t0)
            if diag_now:
                rec["grad_rms"] = gr
                rec["opt"] = ost
                rec["act"] = dict(model.stats, blocks=[dict(b.stats) for b in model.blocks])
            hist.append(rec)
            msg = f"step {step+1:5d} train {ema:.4f} val {vl:.4f} t {time.time()-t0:6.1f}s"
            if diag_now:
                msg += " | g " + " ".join(f"{k}:{v:.1e}" for k, v in gr.items())
                msg += " | u/w " + " ".join(f"{k}:{v['upd_over_w']:.1e}" for k, v in ost.items())
                if a.opt == "adamw":
                    msg += " | <eps " + " ".join(f"{k}:{v['frac_below_eps']:.2f}" for k, v in ost.items())
                msg += " | wrms " + " ".join(f"{k}:{v['w_rms']:.3f}" for k, v in ost.items())
                msg += " | ent " + " ".join(f"{b.stats.get('attn_ent_norm', 0):.2f}" for b in model.blocks)
                msg += " | alog " + " ".join(f"{b.stats.get('attn_logit_std', 0):.2f}" for b in model.blocks)
                msg += f" | logit_std {model.stats.get('logit_std', 0):.2f}"
            print(msg, flush=True)
    wall = time.time() - t0
    final = hist[-1]["val"]
    tokens = a.steps * a.bs * a.ctx
    print(f"FINAL {a.tag} val {final:.4f} tokens {tokens} wall {wall:.0f}s", flush=True)
    cfg = {k: v for k, v in vars(a).items() if k not in ("track", "out")}
    with open(a.out, "a") as f:
        f.write(json.dumps(dict(cfg=cfg, final_val=final, tokens=tokens, wall=wall, hist=hist)) + "\n")


if __name__ == "__main__":
    main()
