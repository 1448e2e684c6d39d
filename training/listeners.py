"""What training does when registry rows (and its own) are saved or deleted: measure new
versions and benchmarks, summarise figures again, drop a deleted job's checkpoint.

They live here rather than in models.py so that what a registry save sets off in training is
found in one named place, not as a side effect of importing the models:
``TrainingConfig.ready()`` imports this module, which connects them.
"""

from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_delete, pre_save
from django.dispatch import receiver

from registry import storage
from registry.models import Expert, ExpertVersion

from .models import Benchmark, BenchmarkResult, EvaluationJob, TrainingJob, refresh_figures


@receiver(post_save, sender=ExpertVersion)
def _measure_on_benchmarks(sender, instance, created, **kwargs):
    """A new version is measured on every benchmark once it is committed."""
    if created and Benchmark.objects.exists():
        transaction.on_commit(
            lambda: EvaluationJob.start_on_benchmarks(instance, Benchmark.objects.all()),
            robust=True,
        )


@receiver(pre_save, sender=Expert)
def _resummarise_on_domain_change(sender, instance, **kwargs):
    """An expert moved to another domain: its versions' own-domain and off-domain figures
    swap benchmarks, so they are summarised again (from the results kept; no GPU)."""
    if instance.pk is None:
        return
    before = Expert.objects.filter(pk=instance.pk).values_list("domain_id", flat=True).first()
    if before is not None and before != instance.domain_id:
        transaction.on_commit(lambda: BenchmarkResult.summarise_all(expert=instance.pk))


@receiver(pre_delete, sender=Benchmark)
def _resummarise_on_benchmark_removal(sender, instance, **kwargs):
    """A benchmark removed: the figures that counted it are summarised again without it, and
    the domain's experts left without a figure get their owner-data one if it was the last."""
    measured = list(instance.results.values_list("version", flat=True))
    domain = instance.domain_id

    def resummarise():
        BenchmarkResult.summarise_all(pk__in=measured)
        refresh_figures(domain=domain, measured_gain__isnull=True)

    transaction.on_commit(resummarise)


@receiver(post_save, sender=Benchmark)
def _measure_everything(sender, instance, created, **kwargs):
    """A new benchmark: every ready version is measured on it once it is committed."""
    if created:
        transaction.on_commit(instance.measure_all_later, robust=True)


@receiver(post_delete, sender=TrainingJob)
def _delete_checkpoint(sender, instance, **kwargs):
    """A deleted job (or one deleted with its expert) takes its checkpoint along."""
    if key := instance.checkpoint_key:
        transaction.on_commit(lambda: storage.delete(key))
