{{/* Names */}}
{{- define "colossal-rlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "colossal-rlhf.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "colossal-rlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "colossal-rlhf.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels */}}
{{- define "colossal-rlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "colossal-rlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "colossal-rlhf.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "colossal-rlhf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: colossal-rlhf
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Serving pods: the API Service, PDB, NetworkPolicy and monitors select these. */}}
{{- define "colossal-rlhf.servingSelectorLabels" -}}
{{ include "colossal-rlhf.selectorLabels" . }}
app.kubernetes.io/component: serving
{{- end }}

{{- define "colossal-rlhf.image" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{- define "colossal-rlhf.pvcName" -}}
{{- default (printf "%s-artifacts" (include "colossal-rlhf.fullname" .)) .Values.artifacts.existingClaim }}
{{- end }}

{{/* Absolute path on the PVC: "runs/x" -> "/artifacts/runs/x"; absolute paths and hf: sources pass through. */}}
{{- define "colossal-rlhf.onPvc" -}}
{{- $p := index . 1 }}
{{- if or (hasPrefix "/" $p) (hasPrefix "hf:" $p) }}{{ $p }}{{ else }}{{ printf "%s/%s" (index . 0).Values.artifacts.mountPath $p }}{{ end }}
{{- end }}

{{/* The output folder of a stage: <mountPath>/runs/<runName>/<stage> */}}
{{- define "colossal-rlhf.stageDir" -}}
{{- $root := index . 0 }}
{{- printf "%s/runs/%s/%s" $root.Values.artifacts.mountPath $root.Values.runName (index . 1) }}
{{- end }}

{{- define "colossal-rlhf.servingModelPath" -}}
{{- if .Values.serving.model.path }}
{{- include "colossal-rlhf.onPvc" (list . .Values.serving.model.path) }}
{{- else }}
{{- include "colossal-rlhf.stageDir" (list . "quantize") }}
{{- end }}
{{- end }}

{{/* Writable places for a read-only root filesystem: caches and HOME live on emptyDirs.
Call with (list $ offline): offline forces HF_HUB_OFFLINE=1 (serving never downloads). */}}
{{- define "colossal-rlhf.cacheEnv" -}}
{{- $offline := index . 1 }}
{{- with index . 0 }}
- name: HOME
  value: /tmp/home
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: TRITON_CACHE_DIR
  value: /tmp/cache/triton
- name: TORCH_EXTENSIONS_DIR
  value: /tmp/cache/torch_extensions
- name: HF_HOME
  value: {{ .Values.artifacts.mountPath }}/.cache/huggingface
- name: PYTHONUNBUFFERED
  value: "1"
{{- if or $offline .Values.huggingface.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- if and .Values.huggingface.tokenSecret (not $offline) }}
- name: HF_TOKEN_PATH
  value: /etc/colossal-rlhf/hf-token/{{ .Values.huggingface.tokenKey }}
{{- end }}
{{- end }}
{{- end }}

{{- define "colossal-rlhf.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "colossal-rlhf.securityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}

{{- define "colossal-rlhf.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The serving config (serving.config.ServeConfig) as YAML. */}}
{{- define "colossal-rlhf.serveConfig" -}}
{{- $s := .Values.serving }}
{{- $perPod := eq $s.mode "deployment" }}
{{- $deployment := dict "num_replicas" (ternary 1 $s.replicas $perPod) "num_gpus" $s.gpusPerReplica "max_ongoing_requests" $s.maxOngoingRequests }}
{{- if and $s.autoscaling.enabled (not $perPod) }}
{{- $_ := set $deployment "autoscaling" (dict "min_replicas" $s.autoscaling.minReplicas "max_replicas" $s.autoscaling.maxReplicas "target_ongoing_requests" $s.autoscaling.targetOngoingRequests) }}
{{- end }}
{{- $base := dict
  "model" (include "colossal-rlhf.servingModelPath" .)
  "served_model_name" $s.servedModelName
  "host" "0.0.0.0"
  "port" ($s.port | int)
  "engine" (dict "gpu_memory_gb" $s.gpuMemoryGB "max_model_len" $s.maxModelLen "max_num_seqs" $s.maxNumSeqs "max_waiting" $s.maxWaiting)
  "deployment" $deployment
  "ray_metrics_export_port" 8080 }}
{{- toYaml (mustMergeOverwrite $base (deepCopy $s.config)) }}
{{- end }}

{{- define "colossal-rlhf.apiKeySecretName" -}}
{{- if .Values.serving.apiKeys.existingSecret }}{{ .Values.serving.apiKeys.existingSecret }}{{ else }}{{ printf "%s-api-keys" (include "colossal-rlhf.fullname" .) }}{{ end }}
{{- end }}

{{- define "colossal-rlhf.apiKeysEnabled" -}}
{{- if or .Values.serving.apiKeys.existingSecret .Values.serving.apiKeys.keys }}true{{ end }}
{{- end }}

{{- define "colossal-rlhf.apiServiceName" -}}
{{- printf "%s-api" (include "colossal-rlhf.fullname" .) }}
{{- end }}

{{- define "colossal-rlhf.apiUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "colossal-rlhf.apiServiceName" .) .Release.Namespace (.Values.serving.service.port | int) }}
{{- end }}

{{/* Pod fields every pod shares: pull secrets and the pod security context. */}}
{{- define "colossal-rlhf.podCommon" -}}
{{- include "colossal-rlhf.imagePullSecrets" . }}
securityContext:
  {{- include "colossal-rlhf.podSecurityContext" . | nindent 2 }}
{{- end }}

{{/* runtimeClassName of GPU pods (e.g. "nvidia" where the NVIDIA container runtime is not the node default). */}}
{{- define "colossal-rlhf.gpuRuntime" -}}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Optional root init container giving the artifacts volume to the pods' user (NFS and other volumes that ignore
fsGroup). Call with (list $ image). Only the volume's top folder: everything below is created by that user. */}}
{{- define "colossal-rlhf.volumePermissions" -}}
{{- $ := index . 0 }}
{{- $v := $.Values.artifacts.volumePermissions }}
{{- if $v.enabled }}
{{- $uid := $.Values.podSecurityContext.runAsUser | default 1000 | int }}
{{- $gid := $.Values.podSecurityContext.fsGroup | default 1000 | int }}
- name: volume-permissions
  image: {{ include "colossal-rlhf.image" (index . 1) }}
  command: [/bin/sh, -ec]
  args:
    - chown {{ $uid }}:{{ $gid }} {{ $.Values.artifacts.mountPath }} && chmod 2775 {{ $.Values.artifacts.mountPath }}
  securityContext:
    runAsUser: 0
    runAsNonRoot: false
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: [ALL]
      add: [CHOWN, FOWNER]
  resources:
    requests: {cpu: 10m, memory: 32Mi}
    limits: {cpu: 100m, memory: 64Mi}
  volumeMounts:
    - {name: artifacts, mountPath: {{ $.Values.artifacts.mountPath }}}
{{- end }}
{{- end }}

{{/* "true" when the artifacts volume can be mounted by pods on several nodes at once. */}}
{{- define "colossal-rlhf.sharedVolume" -}}
{{- if has "ReadWriteMany" .Values.artifacts.accessModes }}true{{ end }}
{{- end }}

{{/* checkov annotation of a Job whose pod runs the opt-in volume-permissions init container. */}}
{{- define "colossal-rlhf.volumePermissionsSkip" -}}
{{- if .Values.artifacts.volumePermissions.enabled }}
annotations:
  checkov.io/skip1: CKV_K8S_25=artifacts.volumePermissions adds CHOWN and FOWNER to its init container to chown the volume's top folder
{{- end }}
{{- end }}
