"""Evaluation: the evaluator (evaluator.py: decode or rank-classify every task, score, write
results), named eval sets (sets.py) and the report (report.py: averages, baselines, tables).
T5's metrics are `t5x_lite.metrics`: tasks name them, so they sit below data/."""

from t5x_lite.evaluation.evaluator import (EvalConfig, Evaluator, check_split, completed,
                                           results_dir)
from t5x_lite.evaluation.report import flat_metrics, format_table

__all__ = ['EvalConfig', 'Evaluator', 'check_split', 'completed', 'flat_metrics',
           'format_table', 'results_dir']
