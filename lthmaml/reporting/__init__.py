"""Reporting: reads run folders only (rounds, scalars, config) and writes plots, tables and the
results section of docs/results.md. Imports no training code."""
