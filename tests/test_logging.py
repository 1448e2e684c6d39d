"""What the service logs: each record once."""

import logging


def handlers_reached(name):
    """The console handlers a record of logger ``name`` is written by (propagation included;
    pytest's capturing handlers left out)."""
    logger, reached = logging.getLogger(name), []
    while logger is not None:
        reached += [h for h in logger.handlers if type(h) is logging.StreamHandler]
        logger = logger.parent if logger.propagate else None
    return reached


def test_a_refused_request_is_logged_once():
    # django.request logs every 4xx and 5xx; with DEBUG on, Django's own default configuration
    # gave the "django" logger a second console handler.
    assert len(handlers_reached("django.request")) == 1
    assert len(handlers_reached("django.server")) == 1
