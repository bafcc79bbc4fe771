-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d):
-- MLflow uses the database POSTGRES_DB creates (`mlflow`); Prefect's server gets its own.
CREATE DATABASE prefect;
