"""Bundled demo data (``battery_weld``) and a synthetic MVTec-layout generator for tests."""
