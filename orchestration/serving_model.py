"""The registered ensemble's model code (MLflow models-from-code): `log_ensemble` logs THIS FILE, not a pickle.

MLflow copies the file into each model version and runs it whenever the version is loaded
(`mlflow.pyfunc.load_model`, `mlflow models serve`); `set_model` hands MLflow the model object, and its
`load_context` reads the version's artifact (ensemble JSON + adapters). The code lives in the installed
package, so grouplora must be importable where the model is loaded (`--env-manager local`).
"""

from mlflow.models import set_model

from grouplora.orchestration.registry import EnsembleModel

set_model(EnsembleModel())
