"""Fakes, emulators and builders the tests share (no tests here): local S3/GCS/Hub/Kubernetes servers,
synthetic data sets, golden-file readers and the tiny training runs."""
