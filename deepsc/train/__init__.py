"""Training: the one engine (:mod:`.engine`), scan-level samples (:mod:`.dataset`), the two
DeepSC stages (:mod:`.stages`, ``deepsc train``), the ablation grid (:mod:`.ablation`,
``deepsc ablate``) and the MONAI baselines (:mod:`.baselines`, ``deepsc baseline``).

Importing this package is cheap: torch, monai and mlflow load inside the functions.
"""
