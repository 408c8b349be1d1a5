"""Is TPC worth using? The benchmark protocol of the field, end to end, resumable.

1. A dense ViT trained once to convergence (its validation curve is recorded and checked for flatness: less than
   ``evidence.flat_gain`` points gained over the last 20% of its epochs): the "pretrained DeiT" every method starts
   from.
2. Every method fine-tuned from it with one recipe (``evidence.finetune_*``: same images, epochs, lr, distillation
   from the dense model), once per seed, at the middle budget (``evidence.train_budget``): TPC, the peers (IdleViT,
   DynamicViT, EViT, ToMe fine-tuned, A-ViT), the claim variants of TPC (no restart, no smoothing, no stabilizer)
   and the dense model itself (the same extra epochs). Training-free ToMe runs on the dense weights.
3. Every fine-tuned model evaluated at every budget (``evidence.budgets``, fractions of the dense GMACs) by moving
   its knob until the GMACs measured on calibration images match; top-1 and GMACs per image on the whole
   validation set.
4. Per budget: mean +- std over seeds, and the paired difference of TPC to the best peer and to each claim variant
   with a 95% t-interval (:mod:`tpcvit.stats`).

Finished fine-tunes and evaluations are reused (``<output>/ft/<method>/seed<k>/``), so the job can be split across
sessions; a killed fine-tune resumes exactly from its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from .bench import machine_info
from .budget import match_gmacs
from .checkpoint import atomic_write, weights_digest
from .config import ConfigError
from .data import take_batches
from .engine import build_model, build_val_data, evaluate, fit, init_distributed, total_epochs
from .models import image_geometry, variant_name
from .patch import AUTO_DECAYS, default_key_pool, fit_schedule, patch
from .reporting import plot_evidence
from .runtime import calibrate_keep_profile, current_policy, set_policy
from .stats import mean_std, paired_difference

# TPC variants -> their model.tpc overrides; peers read their options from model.peer.<method>
# (tpc-hybrid: a candidate improvement, not a claim: the training-free attention signal plus a learned correction
# that starts at zero, fine-tuned like TPC; tpc-pool2: paused tokens' keys pooled per 2 x 2 window, fine-tuned so)
TPC_VARIANTS = {"tpc": {}, "tpc-norestart": {"restart": False}, "tpc-nosmooth": {"smoothing": False},
                "tpc-nostab": {"stabilizer": False}, "tpc-hybrid": {"controller": "hybrid"},
                "tpc-pool2": {"paused_key_pool": 2}}
# evaluation-only variants: the weights of another method's fine-tune, evaluated another way (no CPU for training).
# Every TPC variant is evaluated in budget mode following the schedule it learned (docs/METHOD.md: "k from the
# learned mean schedule"; calibrate_keep_profile). tpc-uniform: TPC's weights, the same keep in every block.
# tpc-adaptive: TPC's weights in adaptive mode (per-image decisions; the knob is adaptive_level). tpc-everyK: TPC's
# weights and learned schedule, deciding in every K-th controlled block only (ExecutionPolicy.decide_every: what
# the batch-1 speed-up of fewer decisions costs in accuracy; every5 on a 6-block model decides once).
DECIDE_EVERY = {"tpc-every2": 2, "tpc-every5": 5}
EVAL_VARIANTS = {"tpc-uniform": "tpc", "tpc-adaptive": "tpc", **dict.fromkeys(DECIDE_EVERY, "tpc")}
PEERS = ("idlevit", "dynamicvit", "evit", "tome-ft", "avit", "tome")
# training-free TPC (tpcvit.patch on the dense weights) -> its patch options beyond the defaults: deciding in every
# k-th controlled block; paused tokens' keys pooled per window of p x p patches (the default picks p from the grid:
# tpcvit.patch.default_key_pool; these rows measure that choice)
FREE_TPC = {"tpc-free": {}, "tpc-free-every2": {"decide_every": 2}, "tpc-free-pool1": {"paused_key_pool": 1},
            "tpc-free-pool2": {"paused_key_pool": 2}}
TRAINING_FREE = ("tome", *FREE_TPC)  # evaluated on the dense weights, no fine-tune, no seeds
METHODS = ("dense", *TPC_VARIANTS, *EVAL_VARIANTS, *PEERS, *FREE_TPC)
CLAIM_VARIANTS = tuple(m for m in (*TPC_VARIANTS, *EVAL_VARIANTS) if m != "tpc")
# static-shape peers: trained with the knob that gives ``train_budget`` GMACs (the model kwarg that holds it)
KNOB_KWARG = {"idlevit": "keep_rate", "dynamicvit": "keep_rate", "evit": "keep_rate", "tome": "tome_r"}
# methods whose budget knob is a share in (0, 1] (keep ratio, keep rate, adaptive level): 1 is its top end
SHARE_KNOB = (*TPC_VARIANTS, *EVAL_VARIANTS, *FREE_TPC, "idlevit", "dynamicvit", "evit")
BUDGET_TOLERANCE = 0.01  # of the dense GMACs: how far a run may land from its budget and still be compared


def misses_budget(run: dict) -> bool:
    """A run that cannot spend its budget: its knob is at the top of its range (every token its schedule allows)
    and its GMACs are still more than :data:`BUDGET_TOLERANCE` of the dense model's below the budget. Comparing
    it would set a model at less compute against one at the budget. (A knob inside its range landed where the
    bisection's GMACs steps allow: those runs are compared.)"""
    knob = run.get("knob")
    return (run["method"] in SHARE_KNOB and knob is not None and knob >= 0.99
            and run["budget"] - run["gmacs_ratio"] > BUDGET_TOLERANCE)


def model_name(cfg: dict, method: str) -> str:
    method = EVAL_VARIANTS.get(method, method)
    if method == "dense" or method in FREE_TPC:
        return variant_name(None, cfg["model"]["name"])
    if method in TPC_VARIANTS:
        return variant_name("tpc", cfg["model"]["name"])
    return variant_name(method.removesuffix("-ft"), cfg["model"]["name"])


def method_config(cfg: dict, method: str) -> dict:
    """The config of ``method``: TPC options for TPC variants, the method's own ``model.peer`` section."""
    c = copy.deepcopy(cfg)
    method = EVAL_VARIANTS.get(method, method)
    if method in TPC_VARIANTS:
        c["model"]["tpc"] = {**c["model"]["tpc"], **TPC_VARIANTS[method]}
    else:
        c["model"]["tpc"] = {}
    c["model"]["name"] = model_name(cfg, method)
    return c


def _done(run: Path, epochs: int) -> bool:
    last = run / "last.json"
    return last.exists() and json.loads(last.read_text()).get("epoch") == epochs and (run / "last.safetensors").exists()


def keep_resumable(run: Path, archive: Path) -> bool:
    """Write ``run``'s resumable state (its last checkpoint, logs and config; not its other checkpoints) to the tar
    ``archive``, atomically. False when the run has no checkpoint yet."""
    meta = _read_json(run / "last.json", None)
    if meta is None:
        return False
    names = [n for n in ("config.yaml", "metrics.jsonl", "steps.jsonl", "timing.json") if (run / n).exists()]
    names += [meta["checkpoint"], "last.json"]

    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w") as tar:
            for name in names:
                tar.add(run / name, arcname=name)

    atomic_write(archive, write)
    return True


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda t: Path(t).write_text(json.dumps(data, indent=2)))


def _add_seconds(run: Path, key: str, seconds: float) -> None:
    """Accumulate wall seconds of a resumable step in ``run/timing.json`` (kept across resumes)."""
    timing = _read_json(run / "timing.json", {})
    timing[key] = timing.get(key, 0.0) + seconds
    _write_json(run / "timing.json", timing)


class DenseChanged(Exception):
    """The dense weights here are not the ones the ledger's runs were fine-tuned from (``digest``: the new ones)."""

    def __init__(self, digest: str) -> None:
        super().__init__(digest)
        self.digest = digest


class Evidence:
    """One setting's evidence run (see the module docstring); ``cfg`` is a full experiment config.

    ``ledger``: a folder (committed beside the results) with one JSON per finished run: its evaluations at every
    budget, training curve and seconds. A run found there is reused as it is, so the job continues in a later
    session even when the run folders (``<output>``, not committed) are gone. The dense backbone is then needed only
    if a fine-tune still is: taken from ``evidence.dense_copy`` (a kept copy of it, written once it is trained)
    when that file holds the ledger's weights, else re-trained (same recipe: deterministic on one kind of CPU).
    """

    def __init__(self, cfg: dict, ledger: str | Path, progress: bool = True, report_only: bool = False) -> None:
        self.cfg, self.progress, self.report_only = cfg, progress, report_only
        self.missing: list[str] = []  # report_only: runs not (completely) in the ledger, left out of the report
        self.ev = cfg["evidence"]
        unknown = [m for m in self.ev["methods"] if m not in METHODS]
        if unknown:
            raise ConfigError(f"evidence.methods: unknown {unknown}; choose from {list(METHODS)}")
        self.out, self.ledger = Path(cfg["output"]), Path(ledger)
        self.dense_digest: str | None = None  # sha256 of the dense weights every run in the ledger started from
        self._dense_checked = False
        self._from_copy = False  # the dense weights are evidence.dense_copy's (the ledger's, not trained here)
        self.info = init_distributed()
        self.log = print if progress and self.info.main else (lambda *a, **k: None)
        probe = build_model(method_config(cfg, "dense"), 1, name=model_name(cfg, "dense"))
        self.geometry = image_geometry(probe)
        self.num_patches = probe.patch_embed.num_patches
        self.grid = tuple(probe.patch_embed.grid_size)
        val_ds, self.val_loader = build_val_data(cfg, self.geometry[0], self.geometry[1], self.info)
        self.num_classes = val_ds.num_classes
        pool = torch.cat([x for x, _ in take_batches(self.val_loader, self.ev["calib_images"])])
        self.calib = pool[: self.ev["calib_images"]].to(self.info.device)

    # ------------------------------------------------------------------------------------------------------
    @property
    def dense_dir(self) -> Path:
        return self.out / "dense"

    @property
    def supplied_dense(self) -> str | None:
        """``evidence.dense_weights``: a converged dense model given by the user (no dense training here)."""
        return self.ev.get("dense_weights")

    @property
    def dense_copy(self) -> Path | None:
        """``evidence.dense_copy``: where the trained dense backbone is kept (a disk that outlives the machine, never
        git: weights stay out of the repository), so a later session on a
        fresh machine, or on another kind of CPU, fine-tunes from the very weights the ledger's runs started from."""
        return Path(self.ev["dense_copy"]) if self.ev.get("dense_copy") else None

    @property
    def dense_weights(self) -> str:
        if self.supplied_dense:
            return self.supplied_dense
        return str(self.dense_copy if self._from_copy else self.dense_dir / "last.safetensors")

    def ensure_dense(self) -> None:
        """Train the dense backbone (or finish it: resumable) unless its weights are there; then check that they are
        the weights the ledger's runs started from (:class:`DenseChanged` otherwise)."""
        if self._dense_checked:
            return  # in place and checked once
        c = method_config(self.cfg, "dense")
        c["output"] = str(self.dense_dir)
        if self.supplied_dense:
            if not Path(self.supplied_dense).is_file():
                raise ConfigError(f"evidence.dense_weights: {self.supplied_dense} not found: give the file of a "
                                  "converged dense model (.safetensors/.pth), or null to train one here")
        elif self._copy_is_the_ledgers():  # the weights every run started from, whatever this machine would train
            self._from_copy = self._dense_checked = True
            self.log(f"== dense backbone: {self.dense_copy} (the ledger's weights: not trained here)")
        elif not _done(self.dense_dir, total_epochs(c["train"])):
            self._train_dense(c)
        if self.dense_digest is not None and not self._dense_checked:
            digest = weights_digest(self.dense_weights)
            if digest != self.dense_digest:
                raise DenseChanged(digest)
            self._dense_checked = True
            self.keep_dense_copy()

    def _copy_is_the_ledgers(self) -> bool:
        kept = self.dense_copy
        return (kept is not None and kept.is_file() and self.dense_digest is not None
                and weights_digest(kept) == self.dense_digest)

    def keep_dense_copy(self) -> None:
        """Write ``evidence.dense_copy`` (atomically) when it does not hold the weights the ledger's runs use."""
        kept = self.dense_copy
        if kept is None or self.supplied_dense or self._from_copy or self.dense_digest is None:
            return
        source = self.dense_dir / "last.safetensors"
        if not source.is_file() or self._copy_is_the_ledgers():
            return
        if weights_digest(source) != self.dense_digest:
            return  # not the ledger's weights (ensure_dense says so when a run needs them)
        atomic_write(kept, lambda t: shutil.copyfile(source, t))
        self.log(f"kept the dense backbone in {kept} (later sessions fine-tune from it)")

    @property
    def dense_partial(self) -> Path | None:
        """Beside ``evidence.dense_copy``: the unfinished dense run's resumable state, kept when the job is stopped
        (Ctrl-C, a deadline's SIGINT) so that a later session on a fresh machine continues it."""
        kept = self.dense_copy
        return kept.with_name(kept.name.removesuffix(".safetensors") + ".partial.tar") if kept else None

    def _train_dense(self, c: dict) -> None:
        init = c["model"].get("init")
        if init and not Path(init).exists():
            raise ConfigError(f"model.init: {init} not found: this setting's dense backbone starts from another "
                              "model's weights; train that one first (e.g. `tpcvit evidence -c "
                              "configs/evidence_fmnist49.yaml` keeps it in its evidence.dense_copy)")
        partial = self.dense_partial
        if partial is not None and partial.is_file() and not (self.dense_dir / "last.json").exists():
            with tarfile.open(partial) as tar:
                tar.extractall(self.dense_dir, filter="data")
            epoch = _read_json(self.dense_dir / "last.json", {}).get("epoch")
            self.log(f"== dense backbone: continuing the unfinished run kept in {partial} (after epoch {epoch})")
        self.log(f"== dense backbone: {total_epochs(c['train'])} epochs (resumable)")
        t0 = time.time()
        try:
            fit(c, resume=(self.dense_dir / "last.json").exists(), progress=self.progress,
                model_name=c["model"]["name"])
        except KeyboardInterrupt:
            if partial is not None and keep_resumable(self.dense_dir, partial):
                self.log(f"kept the unfinished dense run in {partial} (the next session continues it)")
            raise
        _add_seconds(self.dense_dir, "train_s", time.time() - t0)
        if partial is not None and partial.is_file():
            partial.unlink()  # finished: the copy of the weights replaces it

    def dense_recipe(self) -> dict:
        return dense_recipe(self.cfg)

    def finetune_recipe(self) -> dict:
        return finetune_recipe(self.cfg)

    def dense_record(self) -> dict:
        """The dense backbone's validation curve, top-1, GMACs and weights digest (from the ledger, else trained and
        evaluated)."""
        path = self.ledger / "dense_backbone.json"
        if path.exists():
            record = json.loads(path.read_text())
            if record.get("recipe") == self.dense_recipe() and record.get("weights_sha256"):
                self.dense_digest = record["weights_sha256"]
                if self.supplied_dense and not self.report_only:  # the file is at hand: hashing it is cheap
                    self.ensure_dense()
                if not self.report_only:  # trained here, not kept yet (e.g. by a job that predates the copy)
                    self.keep_dense_copy()
                counted = self.dense_train_seconds()  # e.g. a run resumed across sessions counted its last part
                if counted and abs(counted - record.get("seconds", 0.0)) > 0.05 * counted:
                    record["seconds"] = round(counted, 1)
                    _write_json(path, record)
                return record
            self.log(f"{path}: made with another dense recipe (or without its weights' digest); evaluated anew")
        if self.report_only:
            raise ConfigError(f"--report-only: {path} holds no dense backbone of this recipe yet; run the job "
                              "without --report-only first")
        self.ensure_dense()
        t0 = time.time()
        model = build_model(method_config(self.cfg, "dense"), self.num_classes, name=model_name(self.cfg, "dense"),
                            init=self.dense_weights).to(self.info.device).eval()
        point = evaluate(model, self.val_loader, self.info.device, self.info, progress=self.progress,
                         desc="eval dense")
        log = self.dense_dir / "metrics.jsonl"
        curve = [] if self.supplied_dense else [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
        seconds = (self.dense_train_seconds() or _read_json(self.dense_dir / "timing.json", {}).get("train_s", 0.0)
                   ) + time.time() - t0
        record = {"top1": point["top1"], "top5": point["top5"], "gmacs": point["gmacs"],
                  "curve": [e["top1"] for e in curve], "seconds": seconds,
                  **({"last20_gain": None, "converged": None, "epochs": None} if self.supplied_dense
                     else flatness(curve, self.ev["flat_gain"])),
                  "recipe": self.dense_recipe(), "weights_sha256": weights_digest(self.dense_weights)}
        self.dense_digest, self._dense_checked = record["weights_sha256"], True
        _write_json(path, record)
        self.keep_dense_copy()
        return record

    def dense_train_seconds(self) -> float:
        """What training the dense backbone costs alone: its epochs x the median epoch's seconds (images per epoch /
        images per second, from its epoch log). Counts runs split across sessions or killed and resumed whole, and
        leaves out the epochs that were paused or shared the CPU; 0 without the log."""
        path = self.dense_dir / "metrics.jsonl"
        if self.supplied_dense or not path.exists():
            return 0.0
        curve = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        batch, steps = self.cfg["train"]["batch_size"], [0] + [e["global_step"] for e in curve]
        epoch_s = [(steps[i + 1] - steps[i]) * batch / e["train_img_per_s"]
                   for i, e in enumerate(curve) if e.get("train_img_per_s")]
        return float(np.median(epoch_s) * len(curve)) if epoch_s else 0.0

    # ------------------------------------------------------------------------------------------------------
    def finetune_config(self, method: str, seed: int, dense_gmacs: float) -> dict:
        """The fine-tune of ``method`` (an evaluation-only variant: the fine-tune whose weights it uses)."""
        method = EVAL_VARIANTS.get(method, method)
        ev = self.ev
        c = method_config(self.cfg, method)
        c["seed"] = seed
        c["output"] = str(self.run_dir(method, seed))
        c["train"].update(epochs=ev["finetune_epochs"], lr=ev["finetune_lr"], warmup_epochs=ev["finetune_warmup"],
                          cooldown_epochs=0)
        c["data"]["train_limit"] = ev["finetune_train_limit"]
        c["model"]["init"] = self.dense_weights
        c["distill"]["teacher"] = self.dense_weights if ev["finetune_distill"] else None
        c["distill"]["teacher_model"] = model_name(self.cfg, "dense")
        key = method.removesuffix("-ft")
        if key in KNOB_KWARG:  # train at the middle budget
            peer = copy.deepcopy(c["model"]["peer"])
            peer.setdefault(key, {})[KNOB_KWARG[key]] = self.train_knob(method, dense_gmacs)
            c["model"]["peer"] = peer
        return c

    def train_knob(self, method: str, dense_gmacs: float) -> float:
        """The knob of a static-shape method at ``evidence.train_budget`` (weights do not change its GMACs)."""
        model = build_model(method_config(self.cfg, method), self.num_classes, name=model_name(self.cfg, method))
        knob, _ = match_gmacs(model.eval(), self.calib.cpu(), self.ev["train_budget"] * dense_gmacs)
        return round(knob, 4)

    def prepare_eval(self, model: torch.nn.Module, method: str) -> dict:
        """Put a loaded model in the form ``method`` is evaluated in; what to record about it."""
        if method in FREE_TPC:  # training-free TPC: the attention controller on the dense weights
            patch(model, **FREE_TPC[method])
        elif method == "tpc-adaptive":  # the knob becomes adaptive mode's level
            set_policy(model, current_policy(model).replace(mode="adaptive", keep=None, adaptive_level=0.5))
        elif method in TPC_VARIANTS or method in DECIDE_EVERY:  # budget mode follows the learned schedule
            profile = calibrate_keep_profile(model, self.calib)  # measured deciding in every block, as trained
            if method in DECIDE_EVERY:
                set_policy(model, current_policy(model).replace(decide_every=DECIDE_EVERY[method]))
            return {"keep_profile": profile}
        return {}

    def match_budget(self, model: torch.nn.Module, method: str, budget: float,
                     dense_gmacs: float) -> tuple[float, dict]:
        """Move ``method``'s knob to ``budget`` x the dense GMACs: its value and what to record about it.
        Training-free TPC also picks its token schedule per budget, label-free, as ``tpcvit.patch(model, gmacs=...,
        schedule="auto", images=...)`` does for a user (the calibration images, compared with the dense output)."""
        if method in FREE_TPC:
            keep, profile = fit_schedule(model, "auto", gmacs=budget, images=self.calib)
            return keep, {"keep_profile": profile}
        return match_gmacs(model, self.calib, budget * dense_gmacs)[0], {}

    def method_options(self, method: str) -> dict:
        """How a method is evaluated beyond the recipe: a ledger record made otherwise is redone."""
        if method not in FREE_TPC:
            return {}
        options = {"decide_every": 1, "paused_key_pool": default_key_pool(self.grid), **FREE_TPC[method]}
        return {"schedule": "auto", "decays": list(AUTO_DECAYS),
                **{k: v for k, v in options.items() if v > 1}}  # defaults left out: records made before them

    def run_dir(self, method: str, seed: int) -> Path:
        return self.out / "ft" / method / f"seed{seed}"

    # ------------------------------------------------------------------------------------------------------
    def method_run(self, method: str, seed: int | None, dense_gmacs: float) -> list[dict]:
        """One (method, seed): fine-tune (unless training-free), evaluate at every budget; reused from the
        ledger when it is complete there."""
        budgets = [1.0] if method == "dense" else self.ev["budgets"]
        path = self.ledger / f"{method}_seed{seed}.json" if seed is not None else self.ledger / f"{method}.json"
        record = _read_json(path, {"evals": {}})
        if (record.get("recipe") != self.finetune_recipe() or record.get("dense_sha256") != self.dense_digest
                or record.get("options", {}) != self.method_options(method)):
            # from another recipe, another dense model (same recipe trained on another kind of CPU) or evaluated
            # another way: not reusable
            record = {"evals": {}, "recipe": self.finetune_recipe(), "dense_sha256": self.dense_digest,
                      **({"options": self.method_options(method)} if self.method_options(method) else {})}
        todo = [b for b in budgets if f"{b:g}" not in record["evals"]]
        if todo and self.report_only:  # nothing is trained or evaluated: report what the ledger holds
            self.missing.append(path.stem)
            return []
        if todo:
            self.ensure_dense()
            t0 = time.time()
            if method in TRAINING_FREE:
                c, init = method_config(self.cfg, method), self.dense_weights
            else:
                c = self.finetune_config(method, seed, dense_gmacs)
                run = Path(c["output"])
                if not _done(run, total_epochs(c["train"])):
                    self.log(f"== fine-tune {EVAL_VARIANTS.get(method, method)}, seed {seed}")
                    t_fit = time.time()
                    fit(c, resume=(run / "last.json").exists(), progress=self.progress)
                    _add_seconds(run, "train_s", time.time() - t_fit)
                    t0 += time.time() - t_fit  # counted once, through the run's timing.json (kept across resumes)
                init = str(run / "last.safetensors")
                lines = (run / "metrics.jsonl").read_text().splitlines()
                record["curve"] = [json.loads(ln)["top1"] for ln in lines if ln.strip()]
                record["train_knob"] = c["model"]["peer"].get(method.removesuffix("-ft"), {})
            model = build_model(c, self.num_classes, name=c["model"]["name"], init=init).to(self.info.device).eval()
            record.update(self.prepare_eval(model, method))
            for budget in todo:
                knob, extra = None, {}
                if method != "dense":
                    knob, extra = self.match_budget(model, method, budget, dense_gmacs)
                point = evaluate(model, self.val_loader, self.info.device, self.info, progress=self.progress,
                                 desc=f"eval {method} seed {seed} @{budget:.0%}")
                record["evals"][f"{budget:g}"] = {"top1": point["top1"], "top5": point["top5"],
                                                  "gmacs": point["gmacs"], "knob": knob,
                                                  "keep_per_block": point["keep_per_block"], **extra}
            trained = 0.0 if method in TRAINING_FREE else _read_json(run / "timing.json", {}).get("train_s", 0.0)
            record["seconds"] = record.get("eval_seconds", 0.0) + time.time() - t0 + trained
            record["eval_seconds"] = record.get("eval_seconds", 0.0) + time.time() - t0
            _write_json(path, record)
        return [{"method": method, "budget": b, "seed": seed, "top1": record["evals"][f"{b:g}"]["top1"],
                 "gmacs": record["evals"][f"{b:g}"]["gmacs"],
                 "gmacs_ratio": record["evals"][f"{b:g}"]["gmacs"] / dense_gmacs,
                 "knob": record["evals"][f"{b:g}"]["knob"],
                 **({"keep_profile": record["keep_profile"]} if "keep_profile" in record else {})} for b in budgets]

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every method at every budget and seed (finished runs reused); the result with its summary."""
        try:
            return self._run()
        except DenseChanged as changed:  # the ledger's runs started from other weights: none of them is comparable
            self.log(f"the dense backbone trained here (sha256 {changed.digest[:12]}) differs from the one the "
                     f"ledger's runs started from ({(self.dense_digest or '')[:12]}): another kind of CPU or library "
                     "computes the same recipe differently; every run is redone from this one")
            (self.ledger / "dense_backbone.json").unlink()
            self.dense_digest, self._dense_checked, self._from_copy = None, False, False
            return self._run()

    def _run(self) -> dict:
        dense = self.dense_record()
        dense_gmacs = dense["gmacs"]
        runs: list[dict] = []
        methods = self.ev["methods"]
        for method in methods:  # training-free first: no CPU time spent before it shows
            if method in TRAINING_FREE:
                runs += self.method_run(method, None, dense_gmacs)
        for seed in self.ev["seeds"]:  # seed-major: an interrupted job leaves every method with as many seeds
            for method in methods:
                if method not in TRAINING_FREE:
                    runs += self.method_run(method, seed, dense_gmacs)
        result = {
            "setting": self.cfg["name"], "tokens": self.num_patches,
            "dense": {k: dense[k] for k in ("top1", "gmacs", "curve", "last20_gain", "converged", "epochs")},
            "runs": runs, "budgets": self.ev["budgets"], "seeds": self.ev["seeds"],
            "recipe": {k: v for k, v in self.ev.items() if k.startswith("finetune")},
            "cpu_seconds": self.cpu_seconds(), "machine": machine_info(self.info.device), "config": self.cfg,
            "missing": self.missing,
        }
        result["summary"] = summarize(result)
        return result

    def cpu_seconds(self) -> dict:
        """Wall seconds of every run in the ledger (training + evaluation, summed over sessions), 2-core CPU."""
        per = {p.stem: _read_json(p, {}).get("seconds", 0.0) for p in sorted(self.ledger.glob("*.json"))}
        return {"per_run": per, "total": sum(per.values())}


def dense_recipe(cfg: dict) -> dict:
    """What defines the dense backbone: a ledger made with another recipe is not reused. Supplied weights
    (``evidence.dense_weights``) are identified by their digest alone (checked in :meth:`Evidence.ensure_dense`)."""
    c = method_config(cfg, "dense")
    if cfg["evidence"].get("dense_weights"):
        return {"model": c["model"]["name"], "kwargs": c["model"]["kwargs"], "weights": "supplied"}
    data = {k: c["data"][k] for k in ("kind", "train_limit", "aug", "mixup", "cutmix", "label_smoothing")}
    train = {k: v for k, v in c["train"].items() if k not in ("log_every_steps", "ckpt_every_steps",
                                                               "halt_after_steps")}
    recipe = {"model": c["model"]["name"], "kwargs": c["model"]["kwargs"], "data": data, "train": train,
              "seed": c["seed"]}
    if c["model"].get("init"):  # started from another backbone (e.g. the 49-token one for 196 tokens)
        recipe["init"] = c["model"]["init"]
    return recipe


def finetune_recipe(cfg: dict) -> dict:
    """What every fine-tune of a setting shares, including the dense backbone it starts from."""
    ev = cfg["evidence"]
    return {"dense": dense_recipe(cfg), **{k: v for k, v in ev.items() if k.startswith("finetune")},
            "train_budget": ev["train_budget"], "tpc": cfg["model"]["tpc"], "peer": cfg["model"]["peer"]}


def flatness(curve: list[dict], max_gain: float) -> dict:
    """Gain of validation top-1 over the last 20% of the epochs, and whether it is below ``max_gain`` points."""
    top1 = [e["top1"] for e in curve]
    if len(top1) < 2:
        return {"last20_gain": None, "converged": False, "epochs": len(top1)}  # too short to tell
    tail = max(1, math.ceil(0.2 * len(top1)))
    gain = top1[-1] - top1[-1 - tail]
    return {"last20_gain": round(gain, 3), "converged": gain < max_gain, "epochs": len(top1)}


def summarize(result: dict) -> dict:
    """Mean +- std per (method, budget); per budget the best peer and TPC's paired difference to it; TPC's paired
    difference to each claim variant. Runs are paired by seed."""
    by: dict[tuple[str, float], dict] = {}
    for r in result["runs"]:
        by.setdefault((r["method"], r["budget"]), {})[r["seed"]] = r
    table: dict[str, dict] = {}
    for (method, budget), seeds in by.items():
        top1 = [r["top1"] for r in seeds.values()]
        mean, std = mean_std(top1)
        table.setdefault(method, {})[f"{budget:g}"] = {
            "mean": mean, "std": std, "n": len(top1), "top1": top1, "seeds": list(seeds),
            "gmacs_ratio": float(np.mean([r["gmacs_ratio"] for r in seeds.values()]))}

    def paired(a: str, b: str, budget: float, budget_b: float | None = None) -> dict | None:
        ra, rb = by.get((a, budget), {}), by.get((b, budget if budget_b is None else budget_b), {})
        if not ra or not rb:
            return None
        missed = sorted({r["method"] for r in (*ra.values(), *rb.values()) if misses_budget(r)})
        if missed:  # never compared at unequal compute
            return {"missed_budget": missed, "verdict": f"not compared: {', '.join(missed)} cannot spend the budget"}
        if list(rb) == [None]:  # deterministic peer
            common = sorted(ra)
            return paired_difference([ra[s]["top1"] for s in common], [rb[None]["top1"]]).as_dict()
        common = sorted(set(ra) & set(rb))
        if not common:
            return None
        return paired_difference([ra[s]["top1"] for s in common], [rb[s]["top1"] for s in common]).as_dict()

    comparisons, claims, training_free, vs_peers, vs_dense = {}, {}, {}, {}, {}
    for budget in result["budgets"]:
        key = f"{budget:g}"
        if "tpc" in table and "dense" in table:  # TPC at this budget minus the dense model given the same epochs
            vs_dense[key] = paired("tpc", "dense", budget, 1.0)
        for peer in PEERS:
            if "tpc" in table and peer in table and key in table[peer]:
                vs_peers.setdefault(peer, {})[key] = paired("tpc", peer, budget)
        if ("tpc-free", budget) in by and ("tome", budget) in by:  # both deterministic: one number each
            training_free[key] = by[("tpc-free", budget)][None]["top1"] - by[("tome", budget)][None]["top1"]
        peers = {m: table[m][key]["mean"] for m in PEERS if m in table and key in table[m]}
        if "tpc" in table and peers:
            best = max(peers, key=peers.get)
            comparisons[key] = {"best_peer": best, **(paired("tpc", best, budget) or {})}
        for variant in CLAIM_VARIANTS:
            if "tpc" in table and variant in table:
                claims.setdefault(variant, {})[key] = paired("tpc", variant, budget)
    return {"table": table, "tpc_vs_best_peer": comparisons, "tpc_vs_peers": vs_peers, "tpc_vs_dense": vs_dense,
            "claims": claims, "tpc_free_minus_tome": training_free}


# ----------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------
def _fmt_diff(d: dict | None) -> str:
    if d and "missed_budget" in d:
        return d["verdict"]
    if not d or "mean" not in d:
        return "-"
    if d["n"] < 2:
        return f"{d['mean']:+.2f} (1 seed)"
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] {d['verdict']}"


def evidence_markdown(result: dict) -> str:
    s, dense = result["summary"], result["dense"]
    budgets = [f"{b:g}" for b in result["budgets"]]
    if dense["converged"] is None:  # evidence.dense_weights: trained elsewhere
        trained = "supplied weights (trained elsewhere: curve not known here)"
    else:
        trained = (f"{dense.get('epochs')} epochs, gain over the last 20% of its epochs {dense['last20_gain']} pt "
                   f"({'flat' if dense['converged'] else 'NOT flat'})")
    lines = [f"Setting {result['setting']}: {result['tokens']} patch tokens. Dense backbone (the common start): "
             f"top-1 {dense['top1']:.2f}, {dense['gmacs'] * 1e3:.2f} MMACs/img, {trained}.",
             f"Fine-tune recipe (every method): {result['recipe']}; seeds {result['seeds']}.",
             *([f"Not finished yet (left out; the job resumes them): {', '.join(result['missing'])}."]
               if result.get("missing") else []),
             f"CPU time so far: {result['cpu_seconds']['total'] / 3600:.2f} h "
             f"({result['machine']['cpu']}, {result['machine']['threads']} threads, fp32).", "",
             "Top-1 (%) at matched GMACs: mean ± std over seeds (n); GMACs as measured on the validation set.", "",
             "| method | " + " | ".join(f"{float(b):.0%} GMACs" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for method, cells in s["table"].items():
        if method == "dense":
            c = cells["1"]
            lines.append(f"| dense + same epochs | {c['mean']:.2f} ± {c['std']:.2f} ({c['n']}) at 100% |"
                         + " |" * (len(budgets) - 1))
            continue
        row = []
        for b in budgets:
            c = cells.get(b)
            row.append("-" if c is None else f"{c['mean']:.2f} ± {c['std']:.2f} ({c['n']}), {c['gmacs_ratio']:.0%}")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", "TPC minus the best peer at each budget (paired by seed, 95% t-interval):", "",
              "| budget | best peer | TPC - best peer |", "|---|---|---|"]
    for b in budgets:
        c = s["tpc_vs_best_peer"].get(b)
        if c:
            lines.append(f"| {float(b):.0%} | {c['best_peer']} | {_fmt_diff(c)} |")
    if s.get("tpc_vs_peers"):
        lines += ["", "TPC minus every peer (paired by seed, 95% t-interval; a training-free peer is one deterministic "
                  "run):", "", "| peer | " + " | ".join(f"{float(b):.0%}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for peer, cells in s["tpc_vs_peers"].items():
            lines.append(f"| {peer} | " + " | ".join(_fmt_diff(cells.get(b)) for b in budgets) + " |")
    if any(s.get("tpc_vs_dense", {}).values()):
        lines += ["", "TPC at each budget minus the dense model given the same extra epochs (at 100% of the GMACs; "
                  "paired by seed): " + ", ".join(f"{float(b):.0%} GMACs {_fmt_diff(s['tpc_vs_dense'].get(b))}"
                                                  for b in budgets)]
    if s.get("tpc_free_minus_tome"):
        lines += ["", "Training-free: TPC (tpcvit.patch, attention controller) minus ToMe, on the dense weights (one "
                  "deterministic run each): " + ", ".join(f"{float(b):.0%} GMACs {d:+.2f} pt"
                                                         for b, d in s["tpc_free_minus_tome"].items())]
    if s["claims"]:
        lines += ["", "The paper's claims (no restart / smoothing / stabilizer) and TPC's evaluation choices (one keep "
                  "for every block, per-image adaptive decisions): TPC minus each variant (paired by seed, 95% "
                  "t-interval):", "",
                  "| variant | " + " | ".join(f"{float(b):.0%}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for variant, cells in s["claims"].items():
            lines.append(f"| {variant} | " + " | ".join(_fmt_diff(cells.get(b)) for b in budgets) + " |")
    profiles = {r["seed"]: r["keep_profile"] for r in result["runs"] if r["method"] == "tpc" and "keep_profile" in r}
    if profiles:
        lines += ["", "The keep schedule TPC learned (share of active tokens per controlled block in adaptive mode, "
                  "relative to its mean; budget mode keeps `keep x factor` tokens in each block): "
                  + "; ".join(f"seed {seed} [{', '.join(f'{v:.2f}' for v in p)}]" for seed, p in profiles.items())]
    return "\n".join(lines)


def write_evidence(result: dict, out: str | Path) -> list[Path]:
    """``<out>.json``, ``<out>.md``, ``<out>.png``, written atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out.with_suffix(".json"), result)
    md = evidence_markdown(result) + "\n"
    atomic_write(out.with_suffix(".md"), lambda t: Path(t).write_text(md))
    return [out.with_suffix(".json"), out.with_suffix(".md"), plot_evidence(result, out.with_suffix(".png"))]


__all__ = ["Evidence", "evidence_markdown", "flatness", "summarize", "write_evidence"]
