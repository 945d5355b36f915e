"""Shared command-line plumbing for the thin entry points in jobs/."""
from __future__ import annotations

import argparse
import logging
import warnings

from esmm.config import Config, load_config


def setup_logging(level: str = "INFO") -> None:
    # our loggers at ``level``; third-party ones (Horovod's driver logs every rendezvous key at INFO) at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("esmm").setLevel(getattr(logging, level.upper()))
    logging.getLogger("py4j").setLevel(logging.WARNING)
    # petastorm on pyarrow 14 uses the legacy ParquetDataset API: filter exactly those FutureWarnings.
    warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")
    warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--conf", default=None, help="YAML config (default: built-in defaults = conf/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch_size=4096 (repeatable)")
    p.add_argument("--log-level", default="INFO")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, Config]:
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    return args, load_config(args.conf, args.overrides)
