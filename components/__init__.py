"""The pipeline's parts, one package per layer; each imports only the packages below it.

registry -> serving | monitoring | evaluation -> packaging -> training -> features -> models -> data -> core
(import-linter contracts in pyproject.toml; docs/architecture.md says where new work goes).
"""
