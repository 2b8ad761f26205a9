"""deploy/kubernetes: a dry, schema-aware check (no cluster here).

Every object is validated against a JSON schema of the Kubernetes fields it uses (a subset
of the API's OpenAPI schema, with unknown fields refused, so a misspelt or misplaced field
fails), then the fields CRIU and the entrypoint depend on are asserted, and the
environment is checked against what ``fastvllm.container`` actually reads.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from fastvllm import defaults
from fastvllm.container import config as entry_config
from fastvllm.container import supervisor

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kubernetes" / "fastvllm-cpu.yaml"
EXTERNAL_CLAIMS = {"fastvllm-models"}  # the user's model volume, not created by the example


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": required or [], "additionalProperties": False}


STR, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT_OR_STR = {"type": ["integer", "string"]}
QUANTITY = {"type": ["string", "integer"], "pattern": r"^[0-9.]+([EPTGMK]i?|m)?$"}
META = _obj({"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
             "labels": STRMAP, "annotations": STRMAP, "namespace": STR})
RESOURCES = _obj({"requests": {"type": "object", "additionalProperties": QUANTITY},
                  "limits": {"type": "object", "additionalProperties": QUANTITY}})
PROBE = _obj({"exec": _obj({"command": {"type": "array", "items": STR, "minItems": 1}}, ["command"]),
              "httpGet": _obj({"path": STR, "port": INT_OR_STR, "scheme": {"enum": ["HTTP", "HTTPS"]}}, ["port"]),
              "initialDelaySeconds": INT, "periodSeconds": INT, "failureThreshold": INT,
              "timeoutSeconds": INT, "successThreshold": INT})
PROFILE = _obj({"type": {"enum": ["RuntimeDefault", "Unconfined", "Localhost"]}, "localhostProfile": STR}, ["type"])
CONTAINER = _obj({
    "name": STR, "image": STR, "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "command": {"type": "array", "items": STR}, "args": {"type": "array", "items": STR},
    "env": {"type": "array", "items": _obj({"name": STR, "value": STR}, ["name"])},
    "ports": {"type": "array", "items": _obj({"name": STR, "containerPort": INT,
                                              "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}, ["containerPort"])},
    "securityContext": _obj({
        "runAsUser": INT, "runAsNonRoot": BOOL, "privileged": BOOL, "allowPrivilegeEscalation": BOOL,
        "readOnlyRootFilesystem": BOOL,
        "capabilities": _obj({"add": {"type": "array", "items": STR}, "drop": {"type": "array", "items": STR}}),
        "seccompProfile": PROFILE, "appArmorProfile": PROFILE}),
    "resources": RESOURCES,
    "volumeMounts": {"type": "array", "items": _obj({"name": STR, "mountPath": STR, "readOnly": BOOL,
                                                     "subPath": STR}, ["name", "mountPath"])},
    "startupProbe": PROBE, "readinessProbe": PROBE, "livenessProbe": PROBE,
}, ["name", "image"])
VOLUME = _obj({"name": STR,
               "persistentVolumeClaim": _obj({"claimName": STR, "readOnly": BOOL}, ["claimName"]),
               "emptyDir": _obj({"medium": {"enum": ["", "Memory"]}, "sizeLimit": QUANTITY}),
               "hostPath": _obj({"path": STR, "type": STR}, ["path"])}, ["name"])
POD_SPEC = _obj({"containers": {"type": "array", "items": CONTAINER, "minItems": 1},
                 "volumes": {"type": "array", "items": VOLUME}, "hostPID": BOOL, "shareProcessNamespace": BOOL,
                 "enableServiceLinks": BOOL, "terminationGracePeriodSeconds": INT,
                 "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]}}, ["containers"])
SCHEMAS = {
    ("v1", "PersistentVolumeClaim"): _obj({
        "apiVersion": STR, "kind": STR, "metadata": META,
        "spec": _obj({"accessModes": {"type": "array", "items": {
            "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
            "storageClassName": STR,
            "resources": _obj({"requests": _obj({"storage": QUANTITY}, ["storage"])}, ["requests"])},
            ["accessModes", "resources"])}, ["apiVersion", "kind", "metadata", "spec"]),
    ("apps/v1", "Deployment"): _obj({
        "apiVersion": STR, "kind": STR, "metadata": META,
        "spec": _obj({"replicas": INT, "strategy": _obj({"type": {"enum": ["Recreate", "RollingUpdate"]}}),
                      "selector": _obj({"matchLabels": STRMAP}, ["matchLabels"]),
                      "template": _obj({"metadata": META, "spec": POD_SPEC}, ["metadata", "spec"])},
                     ["selector", "template"])}, ["apiVersion", "kind", "metadata", "spec"]),
    ("v1", "Service"): _obj({
        "apiVersion": STR, "kind": STR, "metadata": META,
        "spec": _obj({"selector": STRMAP, "type": STR, "ports": {"type": "array", "items": _obj(
            {"name": STR, "port": INT, "targetPort": INT_OR_STR, "protocol": STR}, ["port"])}}, ["ports"])},
        ["apiVersion", "kind", "metadata", "spec"]),
}


@pytest.fixture(scope="module")
def objects():
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    assert docs, f"{MANIFEST} holds no objects"
    return docs


def _one(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}"
    return found[0]


def test_every_object_matches_its_schema(objects):
    for obj in objects:
        schema = SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
        assert schema, f"unexpected object {obj.get('apiVersion')}/{obj.get('kind')}"
        jsonschema.validate(obj, schema)


def test_the_schema_refuses_a_misplaced_field(objects):
    deployment = _one(objects, "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMAS[("apps/v1", "Deployment")])


def test_criu_security_context(objects):
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod.get("hostPID") is not True and pod.get("shareProcessNamespace") is not True
    (container,) = pod["containers"]
    sec = container["securityContext"]
    assert {"SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN", "SYS_TIME", "CHECKPOINT_RESTORE"} <= set(sec["capabilities"]["add"])
    assert sec["seccompProfile"]["type"] == "Unconfined"
    assert sec["appArmorProfile"]["type"] == "Unconfined"
    assert sec.get("runAsUser", 0) == 0 and not sec.get("runAsNonRoot", False)
    assert "command" not in container, "the image's entrypoint must stay PID 1 (no shell or init shim)"


def test_volumes_and_mounts(objects):
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert {m["name"] for m in mounts.values()} <= set(volumes), "a mount names no volume"
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    snapshots = mounts[env.get("FASTVLLM_SNAPSHOT_DIR", "/snapshots")]
    assert "persistentVolumeClaim" in volumes[snapshots["name"]] and not snapshots.get("readOnly")
    assert "persistentVolumeClaim" in volumes[mounts["/cache"]["name"]]
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    model_mount = [m for path, m in mounts.items() if env["FASTVLLM_MODEL"].startswith(path + "/")]
    assert model_mount and model_mount[0].get("readOnly")
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    used = {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v}
    assert used <= claims | EXTERNAL_CLAIMS
    assert _one(objects, "Deployment")["spec"]["strategy"]["type"] == "Recreate"


def test_environment_ports_and_probes_agree_with_the_entrypoint(objects):
    deployment = _one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    read = set(re.findall(r'"(FASTVLLM_[A-Z_]+)"', inspect.getsource(entry_config.Config.from_env)))
    unknown = {name for name in env if name.startswith("FASTVLLM_")} - read
    assert not unknown, f"the entrypoint does not read {unknown}"
    cfg = entry_config.Config.from_env(env)  # the example's settings are valid ones
    assert cfg.snapshot_on_miss and cfg.host == "0.0.0.0" and cfg.snapshot_level == defaults.snapshot_level()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == cfg.port
    assert container["startupProbe"]["exec"]["command"] == ["test", "-f", "/var/tmp/fastvllm/serving"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", cfg.port)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _one(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", cfg.port)


def test_probe_path_is_the_entrypoints_ready_file(monkeypatch, tmp_path):
    """The image sets FASTVLLM_RUN_DIR=/var/tmp/fastvllm; the probe tests that file."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FASTVLLM_RUN_DIR=/var/tmp/fastvllm" in dockerfile
    monkeypatch.setenv("FASTVLLM_RUN_DIR", str(tmp_path))
    assert supervisor.ready_file() == tmp_path / "serving"
