"""Reporting: reads run folders only (rounds, scalars, config) and writes plots, tables and README's
results section. Imports no training code."""
