"""Evaluation, audit and inspection: faithfulness (evaluate), conservation (audit), report (inspect)."""
