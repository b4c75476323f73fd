"""A run directory, and the only code that knows its file names.

    run_dir/
      config.yaml     the resolved config (every key, defaults included)
      results.json    `RunResults` (results/schema.py), rewritten after every step
      results.md      the same as Markdown tables
      report.html     one offline page (output.plots), figures from plots/
      plots/          PNG figures (output.plots)
      model/          the saved model (model/checkpoint.py)
      DONE            written by `moleflow grid` once the run returned: the run is complete
    grid_dir/
      grid.json       a grid's runs and their overrides (`moleflow report` reads it)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from moleflow.atomic import atomic_write_text
from moleflow.config import Config, ConfigError, save_config
from moleflow.results.schema import ResultsFormatError, RunResults
from moleflow.results.tables import results_markdown

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
RESULTS_MD = "results.md"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
MODEL_DIR = "model"
DONE_MARKER = "DONE"
GRID_FILE = "grid.json"


@dataclass(frozen=True)
class RunDir:
    path: Path

    # The run's files and folders (they need not exist yet).
    model = property(lambda self: self.path / MODEL_DIR)
    results_file = property(lambda self: self.path / RESULTS_FILE)
    config_file = property(lambda self: self.path / CONFIG_FILE)
    plots = property(lambda self: self.path / PLOTS_DIR)
    report = property(lambda self: self.path / REPORT_FILE)

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def save_config(self, cfg: Config) -> None:
        save_config(cfg, self.config_file)

    def read_config(self) -> dict:
        """config.yaml as a plain tree; ConfigError naming the file when it is not valid YAML."""
        try:
            tree = yaml.safe_load(self.config_file.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError(f"{self.config_file} is not valid YAML; delete the run directory {self.path} to run it again") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{self.config_file} does not hold a mapping")
        return tree

    def save_results(self, results: RunResults) -> None:
        """results.json and results.md, each written atomically."""
        atomic_write_text(self.results_file, json.dumps(results.to_json(), indent=2))
        atomic_write_text(self.path / RESULTS_MD, results_markdown(results))

    def read_results(self) -> RunResults | None:
        """The run's results, None when it has none yet; ConfigError naming the file when unreadable."""
        if not self.results_file.is_file():
            return None
        try:
            return RunResults.from_json(json.loads(self.results_file.read_text()), str(self.results_file))
        except (json.JSONDecodeError, UnicodeDecodeError, ResultsFormatError) as exc:
            raise ConfigError(f"{self.results_file} cannot be read ({exc}); use a new run directory") from None

    def mark_done(self, seconds: float) -> None:
        atomic_write_text(self.path / DONE_MARKER,
                          json.dumps({"finished": datetime.now().isoformat(timespec="seconds"), "seconds": round(seconds, 1)}) + "\n")

    def is_done(self) -> bool:
        return self.results_file.is_file() and (self.path / DONE_MARKER).is_file()


def write_grid_listing(grid_dir: Path, listing: dict) -> None:
    atomic_write_text(Path(grid_dir) / GRID_FILE, json.dumps(listing, indent=2))
