"""Running a claimed job: everything between "a worker holds it" and "it ended".

Plain functions over model rows, so tests can run them in-process; ``tasks.py`` wraps them in
Celery with claiming, retries and the error-to-status mapping.
"""

import logging
import math
import tempfile
import time
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from coprocessor import base_models, corpus, routing
from coprocessor.compose import CannotCompose, Composition
from coprocessor.evaluate import evaluate, heldout_set
from coprocessor.train import Cancelled, TrainConfig, train
from coprocessor.watch import reference_ids
from registry import storage
from registry.models import ExpertVersion

from . import datasets, runtime
from .models import (
    Benchmark,
    BenchmarkResult,
    EvaluationJob,
    Job,
    TrainingJob,
)

logger = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.1  # the tail of each dataset that training never sees
MAX_HISTORY = 1000  # loss-curve points kept on a job


class Reporter:
    """Progress callback: writes to the job row every few seconds, not every step, and
    turns a cancel request into ``should_stop()``."""

    def __init__(self, job, history=(), validation=()):
        self.job = job
        self.validation = list(validation)
        self.every = settings.LATENTRY_PROGRESS_SECONDS
        self.history = list(history)
        self.last_write = 0.0
        self.cancelled = False
        self.losses = []
        self.step = 0

    def progress(self, p):
        self.step = p.step
        self.losses.append(p.loss)
        now = time.monotonic()
        if now - self.last_write < self.every and p.step < p.total:
            return
        self.last_write = now
        loss = sum(self.losses) / len(self.losses)  # mean since the last write: a smoother curve
        self.losses = []
        self.history.append([p.step, round(p.elapsed_s, 2), round(loss, 4)])
        if len(self.history) > MAX_HISTORY:  # a long job: keep every other point
            self.history = self.history[::2]
        self.cancelled = self.job.report(
            step=p.step,
            total_steps=p.total,
            steps_estimated=p.estimated,
            loss=loss,
            tokens_per_s=p.tokens_per_s,
            eta_s=p.eta_s,
            history=self.history,
        )

    def check(self, measured):
        """A check of the watch: its point joins the job's validation curve at once."""
        self.validation.append(measured.to_dict())
        self.cancelled = self.job.report(validation=self.validation) or self.cancelled

    def should_stop(self):
        return self.cancelled


def dataset_splits(dataset):
    """(train texts, held-out texts) of a dataset: the same split for every job."""
    return corpus.split_texts(datasets.read_texts(dataset), HELDOUT_FRACTION)


def train_config(job, tokenizer, train_tokens):
    """The job's TrainConfig: its params, the prefix sized to ``train_tokens`` unless they
    name a size, and the operator's bound on harm to other text."""
    params = {
        **job.params,
        "anchor_token_id": base_models.space_token_id(tokenizer),
        "harm_bound_pct": settings.LATENTRY_HARM_BOUND_PCT,
    }
    return TrainConfig.from_settings(params, train_tokens=train_tokens)


def run_training(job, device):
    """Train, publish the next version (once), profile it, and queue its evaluation."""
    made = job.published_version
    if made is not None:  # published before a crash: only the ending is left to do
        return _succeed(job, made)
    try:  # a dataset may have become a benchmark since the job was queued
        TrainingJob.check_trainable(list(job.datasets.all()))
    except ValidationError as exc:
        raise runtime.JobError(exc.messages[0]) from None
    decoder, tokenizer = runtime.base_model(job.base_model, device)
    texts = [text for d in job.datasets.all() for text in dataset_splits(d)[0]]
    token_ids = corpus.tokenize(tokenizer, texts)
    config = train_config(job, tokenizer, len(token_ids))
    with tempfile.TemporaryDirectory(prefix=f"latentry-job-{job.pk}-") as scratch:
        checkpoint = Path(scratch) / "checkpoint.pt"
        resume = _fetch_checkpoint(job, checkpoint)
        upto = job.checkpoint_step if resume else -1  # what the checkpoint already holds
        reporter = Reporter(
            job,
            [h for h in job.history if h[0] <= upto],
            [m for m in job.validation if m["step"] <= upto],
        )
        job.report(
            train_tokens=len(token_ids),
            # With a time budget the total is estimated from the steps' pace once they run.
            total_steps=0 if config.time_budget_s else config.steps,
            steps_estimated=bool(config.time_budget_s),
            resumed_from_step=job.checkpoint_step if resume else None,
        )
        result = train(
            decoder,
            token_ids,
            config,
            on_progress=reporter.progress,
            on_check=reporter.check,
            reference_ids=reference_ids(tokenizer),
            should_stop=reporter.should_stop,
            checkpoint_path=checkpoint,
            on_checkpoint=lambda path: _store_checkpoint(job, path, reporter),
            resume_from=checkpoint if resume else None,
        )
        job.report(  # the run's end settles the estimate
            step=result.steps,
            total_steps=result.steps,
            steps_estimated=False,
            validation=result.validation,
            stopped=result.stopped,
            kept_step=result.kept_step,
            within_harm_bound=result.within_harm_bound,
            outcome=result.summary,
        )
        profile = routing.profile(decoder, token_ids, window=config.window)
        out = Path(scratch) / "expert.safetensors"
        result.expert.save(
            out,
            job.base_model.fingerprint,
            job.base_model.slug,
            training={
                **config.to_dict(),
                "steps_done": result.steps,
                "stopped": result.stopped,
                "kept_step": result.kept_step,
                "job": job.pk,
            },
        )
        # The expert takes the visibility the job asked for before the version appears in it:
        # a version trained on private data is never public for a moment.
        job.apply_visibility()
        with out.open("rb") as f:
            version = ExpertVersion.publish(
                job.expert,
                f,
                sha256=storage.sha256_of(f),
                size=out.stat().st_size,
                changelog=f"trained by job #{job.pk}: {result.summary}",
                training_job=job,
                routing_profile=profile,
            )
    return _succeed(job, version)


def _succeed(job, version):
    # One transaction: nobody sees the job succeeded before its evaluation exists (the job
    # page stops polling at a finished job with no evaluation running).
    with transaction.atomic():
        if job.finish(Job.SUCCEEDED):
            EvaluationJob.start_after_training(job, version)
    return version


def _fetch_checkpoint(job, local):
    if not job.checkpoint_key:
        return False
    try:
        with storage.open_artifact(job.checkpoint_key) as stored:
            local.write_bytes(stored.read())
    except FileNotFoundError:
        logger.warning("checkpoint %s of job %s is gone; starting over", job.checkpoint_key, job.pk)
        return False
    return True


def _store_checkpoint(job, path, reporter):
    """Upload under a new key per step, then point the job at it, then drop the old one:
    the job always names a complete checkpoint."""
    step = reporter.step
    key = f"checkpoints/training-job-{job.pk}-attempt-{job.attempts}-step-{step}.pt"
    with path.open("rb") as f:
        storage.put(key, f)
    previous = job.checkpoint_key
    job.report(checkpoint_key=key, checkpoint_step=step, history=reporter.history)
    if previous and previous != key:
        storage.delete(previous)


def run_evaluation(job, device):
    """Held-out perplexity per dataset, stored on the version as platform-measured metrics."""
    if job.on_benchmarks:
        return run_benchmarks(job, device)
    version = job.version
    base = version.expert.base_model
    decoder, tokenizer = runtime.base_model(base, device)
    expert = runtime.load_version(version, decoder)
    params = job.params
    reports, profile_texts = [], []
    datasets_list = list(job.datasets.all())
    job.report(total_steps=len(datasets_list))
    for done, dataset in enumerate(datasets_list):
        train_texts, heldout_texts = dataset_splits(dataset)
        everything = params.get("split", "heldout") == "all"
        texts = train_texts + heldout_texts if everything else heldout_texts
        profile_texts += train_texts
        report = _evaluate_dataset(decoder, tokenizer, expert, texts, params, dataset)
        reports.append(report)
        if job.report(step=done + 1):
            raise Cancelled(f"cancelled after {done + 1} of {len(datasets_list)} datasets")
    profile = None
    if not version.routing_profile and profile_texts:
        profile = routing.profile(decoder, corpus.tokenize(tokenizer, profile_texts))
    _record_metrics(job, version, reports, profile)
    return reports


def run_benchmarks(job, device):
    """Measure the version on each benchmark's whole text with that benchmark's fixed, seeded
    pairs; record one BenchmarkResult each and the version's summary, then end the job."""
    version = job.version
    if job.partner is None and not version.is_newest_ready():  # superseded: never shown
        job.finish(Job.SUCCEEDED, result={"skipped": "a newer version was published"})
        return []
    base = version.expert.base_model
    decoder, tokenizer = runtime.base_model(base, device)
    expert = measured_expert(job, decoder)
    benchmarks = list(
        Benchmark.objects.filter(dataset__in=job.datasets.all()).select_related("domain")
    )
    job.report(total_steps=len(benchmarks))
    reports = []
    for done, benchmark in enumerate(benchmarks):
        texts = datasets.read_texts(benchmark.dataset)  # all of it: nobody trains on any
        params = {**benchmark.params, "window": min(benchmark.window, base.context_length)}
        report = _evaluate_dataset(decoder, tokenizer, expert, texts, params, benchmark.dataset)
        reports.append((benchmark, report))
        if job.report(step=done + 1):
            raise Cancelled(f"cancelled after {done + 1} of {len(benchmarks)} benchmarks")
    if job.partner is not None:  # the composition's figures are the pairing's alone
        job.finish(Job.SUCCEEDED, result={"pairing": [_paired(b, r) for b, r in reports]})
        return reports
    with transaction.atomic():
        for benchmark, report in reports:
            BenchmarkResult.record(version, benchmark, report, job)
        BenchmarkResult.summarise(version)
        job.finish(Job.SUCCEEDED, result={"benchmarks": [_public(r) for _, r in reports]})
    return reports


def measured_expert(job, decoder):
    """The expert a measurement runs: the version's, or for a pairing the version's and its
    partner's composed (``coprocessor.compose``)."""
    expert = runtime.load_version(job.version, decoder)
    if job.partner is None:
        return expert
    parts = [expert, runtime.load_version(job.partner, decoder)]
    try:
        return Composition(parts, names=[job.version.full_name, job.partner.full_name])
    except CannotCompose as exc:
        raise runtime.JobError(str(exc)) from None


def _paired(benchmark, report):
    """A pairing's figure on one benchmark: its domain, not its text's name (the benchmark's
    dataset is staff's; the pairing may show on a public page)."""
    return {
        "benchmark": benchmark.pk,
        "domain": benchmark.domain.slug,
        "pairs": report["pairs"],
        "reduction_pct": round(report["reduction_pct"], 2),
        "latency_ratio": round(report["latency_ratio"], 2),
    }


def _public(report):
    """What the owner sees of a benchmark measurement: its figures to two decimals, and not
    the per-position curve nor the perplexities, which say more about the text than the
    leaderboard needs (and, exact, would give the reduction back to every decimal)."""
    shown = {key: report[key] for key in ("dataset", "window", "ahead", "pairs")}
    return {
        **shown,
        "reduction_pct": round(report["reduction_pct"], 2),
        "latency_ratio": round(report["latency_ratio"], 2),
    }


def _evaluate_dataset(decoder, tokenizer, expert, texts, params, dataset):
    ids = corpus.tokenize(tokenizer, texts)
    ahead = params.get("ahead", 16)
    needed = 16 + ahead + 4
    window = min(params.get("window", 256), len(ids))
    if window < needed:
        raise runtime.JobError(
            f"dataset {dataset.full_name} has {len(ids)} held-out tokens; "
            f"evaluation needs at least {needed}"
        )
    heldout = heldout_set(
        ids,
        window=window,
        ahead=ahead,
        max_windows=params.get("max_windows", 32),
    )
    report = evaluate(decoder, expert, heldout)
    _check_finite(report, dataset)
    return {
        "dataset": dataset.full_name,
        "dataset_sha256": dataset.sha256,
        "split": params.get("split", "heldout"),
        "window": window,
        "ahead": ahead,
        "pairs": report["pairs"],
        "ppl_base": report["base"]["ppl"],
        "ppl_expert": report["augmented"]["ppl"],
        "reduction_pct": report["reduction_pct"],
        "latency_ratio": report["latency_ratio"],
        "ppl_base_by_position": report["base"]["ppl_by_position"],
        "ppl_expert_by_position": report["augmented"]["ppl_by_position"],
    }


def _check_finite(report, dataset):
    """JobError unless the measured figures are numbers: an expert whose values overflow the
    base model's attention or logits makes the perplexity inf or NaN, which must end the job
    with that reason (not with the database's refusal to store a NaN)."""
    figures = {
        "base perplexity": report["base"]["ppl"],
        "perplexity with the expert": report["augmented"]["ppl"],
        "reduction": report["reduction_pct"],
    }
    broken = [f"{name} {value}" for name, value in figures.items() if not math.isfinite(value)]
    if broken:
        raise runtime.JobError(
            f"measuring on {dataset.full_name} gave no finite figures ({', '.join(broken)}): "
            "the expert's values make the base model's numbers overflow"
        )


def _record_metrics(job, version, reports, profile):
    """Record the results on the version and end the job, in one transaction."""
    with transaction.atomic():
        version.record_evaluation(reports, job_id=job.pk, profile=profile)
        job.finish(Job.SUCCEEDED, result={"evaluations": reports})
