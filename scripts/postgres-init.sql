-- MLflow's tracking server keeps its own database beside the platform's.
CREATE DATABASE mlflow OWNER trainyard;
