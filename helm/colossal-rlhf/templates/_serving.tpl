{{/* Pieces of the serving pods shared by the Deployment and the RayService. */}}

{{- define "colossal-rlhf.servingGpus" -}}
{{- $g := float64 .Values.serving.gpusPerReplica }}{{ if gt $g 0.0 }}{{ ceil $g | int }}{{ else }}0{{ end }}
{{- end }}

{{/* init containers: fetch the model, then wait for its manifest.json */}}
{{- define "colossal-rlhf.servingInitContainers" -}}
{{- $s := .Values.serving }}
{{- $model := include "colossal-rlhf.servingModelPath" . }}
{{- if $s.model.download }}
- name: fetch-model
  image: {{ include "colossal-rlhf.image" .Values.images.serving }}
  imagePullPolicy: {{ .Values.images.serving.pullPolicy }}
  command: [python, /opt/colossal-rlhf/stagectl.py, fetch]
  args: [{{ $s.model.download | quote }}, {{ $model | quote }}]
  env:
    {{- include "colossal-rlhf.cacheEnv" (list . false) | nindent 4 }}
  securityContext:
    {{- include "colossal-rlhf.securityContext" . | nindent 4 }}
  resources:
    requests: {cpu: 500m, memory: 1Gi}
    limits: {cpu: "2", memory: 4Gi}
  volumeMounts:
    - {name: artifacts, mountPath: {{ .Values.artifacts.mountPath }}}
    - {name: scripts, mountPath: /opt/colossal-rlhf, readOnly: true}
    - {name: tmp, mountPath: /tmp}
    {{- if .Values.huggingface.tokenSecret }}
    - {name: hf-token, mountPath: /etc/colossal-rlhf/hf-token, readOnly: true}
    {{- end }}
{{- else if and $s.model.waitForManifest (not (include "colossal-rlhf.servingOrchestrated" .)) }}
{{- /* no pipeline in this release: the model must already be complete; fail fast rather than hold the GPU */}}
- name: check-model
  image: {{ include "colossal-rlhf.image" .Values.images.serving }}
  imagePullPolicy: {{ .Values.images.serving.pullPolicy }}
  command: [python, /opt/colossal-rlhf/stagectl.py, wait, {{ $model | quote }}, --timeout=60, --interval=5]
  securityContext:
    {{- include "colossal-rlhf.securityContext" . | nindent 4 }}
  resources:
    requests: {cpu: 50m, memory: 64Mi}
    limits: {cpu: 200m, memory: 256Mi}
  volumeMounts:
    - {name: artifacts, mountPath: {{ .Values.artifacts.mountPath }}, readOnly: true}
    - {name: scripts, mountPath: /opt/colossal-rlhf, readOnly: true}
{{- end }}
{{- end }}

{{- define "colossal-rlhf.servingEnv" -}}
{{- include "colossal-rlhf.cacheEnv" (list . true) }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if include "colossal-rlhf.apiKeysEnabled" . }}
- name: API_KEYS_FILE
  value: /etc/colossal-rlhf/api-keys/{{ .Values.serving.apiKeys.secretKey }}
{{- end }}
{{- with .Values.serving.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "colossal-rlhf.servingProbes" -}}
{{- $p := .Values.serving.probes }}
startupProbe:
  httpGet: {path: /health, port: http}
  {{- toYaml $p.startup | nindent 2 }}
readinessProbe:
  httpGet: {path: /ready, port: http}
  {{- toYaml $p.readiness | nindent 2 }}
livenessProbe:
  httpGet: {path: /health, port: http}
  {{- toYaml $p.liveness | nindent 2 }}
{{- end }}

{{- define "colossal-rlhf.servingResources" -}}
{{- $res := deepCopy .Values.serving.resources }}
{{- $gpus := include "colossal-rlhf.servingGpus" . | int }}
{{- $limits := default dict $res.limits }}
{{- $requests := default dict $res.requests }}
{{- if gt $gpus 0 }}
{{- $_ := set $limits "nvidia.com/gpu" $gpus }}
{{- $_ := set $requests "nvidia.com/gpu" $gpus }}
{{- end }}
{{- toYaml (dict "limits" $limits "requests" $requests) }}
{{- end }}

{{- define "colossal-rlhf.servingVolumeMounts" -}}
- {name: artifacts, mountPath: {{ .Values.artifacts.mountPath }}, readOnly: true}
- {name: serve-config, mountPath: /etc/colossal-rlhf/serve, readOnly: true}
- {name: tmp, mountPath: /tmp}
- {name: dshm, mountPath: /dev/shm}
{{- if include "colossal-rlhf.apiKeysEnabled" . }}
- {name: api-keys, mountPath: /etc/colossal-rlhf/api-keys, readOnly: true}
{{- end }}
{{- end }}

{{- define "colossal-rlhf.servingVolumes" -}}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "colossal-rlhf.pvcName" . }}
- name: serve-config
  configMap:
    name: {{ include "colossal-rlhf.fullname" . }}-serving
- name: scripts
  configMap:
    name: {{ include "colossal-rlhf.fullname" . }}-scripts
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.serving.shmSize }}
{{- if include "colossal-rlhf.apiKeysEnabled" . }}
- name: api-keys
  secret:
    secretName: {{ include "colossal-rlhf.apiKeySecretName" . }}
    defaultMode: 0440
{{- end }}
{{- if and .Values.serving.model.download .Values.huggingface.tokenSecret }}
- name: hf-token
  secret:
    secretName: {{ .Values.huggingface.tokenSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "colossal-rlhf.servingScheduling" -}}
{{- with .Values.serving.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serving.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serving.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
