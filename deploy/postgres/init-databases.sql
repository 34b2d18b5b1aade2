-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d/).
-- One server, two databases, both owned by POSTGRES_USER: MLflow's tracking store and registry,
-- and Prefect's orchestration database.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
