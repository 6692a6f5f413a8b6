"""Neuron health of the MLPs during training: the measurements behind Aurora's motivation.

An MLP's fc weight is tall, one row per hidden neuron. At every validation step, per block:

    dead      fraction of neurons whose pre-activation is positive on fewer than `dead_threshold`
              of the probe tokens (relu^2 then outputs zero almost always);
    leverage  row leverage r_i = ||O_i||^2 / (cols/rows) of the fc update's orthogonalized
              direction O in the step just before (1 = uniform): its coefficient of variation,
              its minimum, and `starved` = fraction of rows with r_i < starved_threshold
              (not measured, None, when the update was zero: the first steps of a model whose
              mlp.proj starts at zero);
    frozen    fraction of neurons whose fc row moved since initialization by less than
              frozen_threshold of the median row movement.

Optional: harness.py makes one `NeuronHealth` per trial and calls `before_step` and `report` at the
trainer's named points; both return at once when diagnostics are off. The leverage comes from a
`LeverageProbe`, which wraps the trial's Aurora from outside. Nothing here changes training (a
log's code part, run alone, has no diagnostics).
"""
import dataclasses
import json

import torch
import torch.distributed as dist

from aurora import RECORD


def diag_field(default, help):
    return dataclasses.field(default=default, metadata=dict(help=help))


@dataclasses.dataclass
class DiagnosticsHyperparameters:
    """The diagnostics' flags (harness.py adds them to the trainer's: it runs the diagnostics)."""
    diagnostics: bool = diag_field(True, "measure dead/starved/frozen MLP neurons at validation steps")
    diag_tokens: int = diag_field(64 * 1024, "rank 0's first validation tokens used for `dead`")
    dead_threshold: float = diag_field(0.001, "dead: positive pre-activation on < this fraction of tokens")
    starved_threshold: float = diag_field(0.1, "starved: row leverage < this fraction of uniform")
    frozen_threshold: float = diag_field(0.1, "frozen: moved < this fraction of the median row movement")


def row_leverage(O):
    """Row leverage ||O_i||^2 / (n/m) of O in its tall orientation (1: uniform)."""
    O = O.float()
    rows, cols = O.size(-2), O.size(-1)
    return (O if rows >= cols else O.mT).square().sum(dim=-1) * (max(rows, cols) / min(rows, cols))


class LeverageProbe:
    """The row leverage of an Aurora's (or a variant's) orthogonalized updates, on the steps asked
    for, from outside the optimizer: it wraps the optimizer's `_apply` (one matrix's rule, or a
    stack's), which leaves the look-ahead it orthogonalized in its `grads` (Nesterov; else the
    momentum), and keeps a reference to it; the lineage's and the frontier's per-matrix rules
    hand it over themselves (LineageAurora.probe, FrontierAurora.probe). Nothing is computed during the step and nothing compiled changes:
    pop_leverage() recomputes the orthogonalization, eagerly, later. Tracking lasts one step."""

    def __init__(self, aurora):
        self.aurora, self.tracking, self.kept = aurora, False, {}
        aurora.register_step_post_hook(lambda *args: setattr(self, "tracking", False))
        aurora.probe = self
        apply = aurora._apply

        def probed(group, params, grads, momenta, weights, state=None):
            if not self.tracking:
                return apply(group, params, grads, momenta, weights, state)
            before = None if state is None else state.clone()  # a variant's state, as step 3 sees it
            apply(group, params, grads, momenta, weights, state)
            hp = {k: group[k] for k in RECORD}
            lookahead = grads if hp["nesterov"] else momenta
            for j, p in enumerate(params):
                one = (lambda t: t) if lookahead.ndim == 2 else (lambda t: t[j])  # a stack: matrix j
                self.keep(p, aurora.orthogonalize, one(lookahead), hp, None if state is None else one(before))
        aurora._apply = probed

    def track_leverage(self):
        """Keep the look-aheads of the next step (the one whose result a validation reports)."""
        self.tracking = True

    def keep(self, p, orthogonalize, u, hp, state=None):
        if self.tracking:
            self.kept[p] = (orthogonalize, u, hp, state)

    @torch.no_grad()
    def pop_leverage(self):
        """{matrix: row leverage} of the last tracked step's orthogonalized updates (this rank's
        matrices), recomputed uncompiled from the kept look-aheads; then forgotten."""
        kept, self.kept = self.kept, {}
        return {p: row_leverage(orthogonalize(u, hp) if state is None else orthogonalize(u, hp, state))
                for p, (orthogonalize, u, hp, state) in kept.items()}


class NeuronHealth:
    """Rank 0 measures (it keeps the initial fc rows and counts activations on `tokens`, its
    first validation inputs, shape (n, seq_len)); every rank joins the all-reduce of the leverage
    (from `leverage`, the trial's LeverageProbe), which lives on the rank that updated each fc
    matrix."""

    def __init__(self, model, leverage, tokens, hp, ctx, jsonl=None):
        self.enabled = hp.diagnostics
        if not self.enabled:
            return
        self.model, self.leverage, self.hp, self.ctx, self.jsonl = model, leverage, hp, ctx, jsonl
        self.fcs = [block.mlp.fc for block in model.blocks]
        self.tokens = tokens
        self.fc_init = ([fc.weight.detach().float().clone() for fc in self.fcs]
                        if ctx.rank == 0 else None)

    def before_step(self, next_step_validates):
        """Ask the probe to keep the look-ahead of the step whose result the next validation
        reports (a reference: nothing is computed in the step; report() computes the leverage)."""
        if self.enabled and next_step_validates:
            self.leverage.track_leverage()

    def report(self, trial, step, log):
        """Measure (collective), write one JSON object per layer and one summary line to the log."""
        if not self.enabled:
            return
        rows = self.measure()
        if rows is None:
            return
        log(summary_line(rows))
        for row in rows:
            self.jsonl.write(json.dumps(dict(trial=trial, step=step, **row)) + "\n")
        self.jsonl.flush()

    @torch.no_grad()
    def measure(self):
        """One dict per layer on rank 0 (see the module docstring), None on other ranks."""
        hidden, device = self.fcs[0].weight.size(0), self.fcs[0].weight.device
        leverage = self.leverage.pop_leverage()
        lev = torch.zeros(len(self.fcs), hidden, device=device)
        have = torch.zeros(len(self.fcs), device=device)
        for i, fc in enumerate(self.fcs):
            if fc.weight in leverage:
                lev[i], have[i] = leverage[fc.weight], 1
        if self.ctx.world > 1:
            dist.all_reduce(lev)
            dist.all_reduce(have)
        if self.ctx.rank != 0:
            return None
        positive, n_tokens = self.count_positive()
        rows = []
        for i, fc in enumerate(self.fcs):
            moved = (fc.weight.float() - self.fc_init[i]).norm(dim=1)
            median = moved.median()
            row = dict(layer=i, tokens=n_tokens,
                       dead=(positive[i] < self.hp.dead_threshold * n_tokens).float().mean().item(),
                       frozen=(moved < self.hp.frozen_threshold * median).float().mean().item()
                       if median > 0 else None)
            r = lev[i]
            if have[i] and r.sum() > 0:
                row.update(leverage_cv=(r.std() / r.mean()).item(), leverage_min=r.min().item(),
                           starved=(r < self.hp.starved_threshold).float().mean().item())
            else:  # no update yet (step 0), or a zero one (the first steps, while mlp.proj is still
                # zero: no gradient reaches fc): no direction whose rows could be starved
                row.update(leverage_cv=None, leverage_min=None, starved=None)
            rows.append(row)
        return rows

    def count_positive(self):
        """Per layer and neuron, on how many probe tokens the fc pre-activation is > 0: forward
        hooks on the eager model's trunk (no logits needed)."""
        positive = torch.zeros(len(self.fcs), self.fcs[0].weight.size(0), device=self.tokens.device)

        def counter(i):
            def hook(module, args, out):
                positive[i] += (out > 0).flatten(0, -2).sum(0)
                # returns None: a forward hook that returns a value replaces the module's output
            return hook

        hooks = [fc.register_forward_hook(counter(i)) for i, fc in enumerate(self.fcs)]
        try:
            for xm in self.tokens.split(self.ctx.micro):
                self.model.trunk(xm)
        finally:
            for h in hooks:
                h.remove()
        return positive, self.tokens.numel()


def summary_line(rows):
    """One log line: each diagnostic's mean over layers."""
    def mean(key):
        values = [r[key] for r in rows if r[key] is not None]
        return f"{sum(values) / len(values):.4f}" if values else "nan"
    return (f"diagnostics: dead:{mean('dead')} starved:{mean('starved')} "
            f"leverage_cv:{mean('leverage_cv')} leverage_min:{mean('leverage_min')} "
            f"frozen:{mean('frozen')} (mean over {len(rows)} MLP layers)")
