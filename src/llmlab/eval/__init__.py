"""Evaluation: tasks with answers, LLM-as-a-judge with its own reliability report, long context, reports."""
