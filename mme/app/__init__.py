"""The application: ``mme protect`` (prepare -> poison -> verify -> export), its dry-run plan,
the typed Python API and ``mme bench``; built on the stages, imported by no stage."""
