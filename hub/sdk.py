"""Every authoring name in one import, as ``airflow.sdk`` has them: a DAG file
ported from Airflow changes ``from airflow.sdk import ...`` (or
``airflow.decorators``, ``airflow.operators.python``...) to
``from hub.sdk import ...``.

Outpost's names for Airflow's: ``AgentOperator`` runs a job type on devices
(no Airflow equivalent); ``TaskSkipped``/``TaskFailedNoRetry``/
``SensorTimeout`` are also importable as ``AirflowSkipException``/
``AirflowFailException``/``AirflowSensorTimeout``.
"""

from __future__ import annotations

from hub.dag import (
    DAG,
    AgentOperator,
    AirflowFailException,
    AirflowSensorTimeout,
    AirflowSkipException,
    BaseBranchOperator,
    BaseOperator,
    BaseSensorOperator,
    BranchPythonOperator,
    EmptyOperator,
    PokeReturnValue,
    PythonOperator,
    PythonSensor,
    Rollout,
    SensorTimeout,
    ShortCircuitOperator,
    Target,
    TaskFailedNoRetry,
    TaskGroup,
    TaskRescheduled,
    TaskSkipped,
    XComArg,
    any_agent,
    chain,
    cross_downstream,
    every_agent,
    on_agent,
)
from hub.assets import AgentEvent, Asset, AssetAll, AssetAny, Dataset
from hub.masking import mask_secret
from hub.params import Param
from hub.secretvars import Connection, Variable
from hub.taskflow import dag, task, task_group

__all__ = [
    "Connection", "Variable", "mask_secret",
    "Asset", "AssetAll", "AssetAny", "AgentEvent", "Dataset",
    "DAG", "AgentOperator", "AirflowFailException", "AirflowSensorTimeout", "AirflowSkipException", "BaseBranchOperator",
    "BaseOperator", "BaseSensorOperator", "BranchPythonOperator", "EmptyOperator", "Param", "PokeReturnValue", "PythonOperator",
    "PythonSensor", "Rollout", "SensorTimeout", "ShortCircuitOperator", "Target", "TaskFailedNoRetry", "TaskGroup", "TaskRescheduled",
    "TaskSkipped", "XComArg", "any_agent", "chain", "cross_downstream", "dag", "every_agent", "on_agent", "task", "task_group",
]
