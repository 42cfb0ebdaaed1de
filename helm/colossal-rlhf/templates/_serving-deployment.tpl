{{/* The serving Deployment: a Helm object, or created by the orchestrator once the model exists. */}}
{{- define "colossal-rlhf.servingDeployment" -}}
{{- $s := .Values.serving }}
{{- if lt (int $s.maxOngoingRequests) (add $s.maxNumSeqs $s.maxWaiting | int) }}
{{- fail "serving.maxOngoingRequests must be at least serving.maxNumSeqs + serving.maxWaiting" }}
{{- end }}
# Each pod runs its own one-node Ray instance with one Ray Serve replica: `python -m serving`.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "colossal-rlhf.fullname" . }}-serving
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "colossal-rlhf.labels" . | nindent 4 }}
    app.kubernetes.io/component: serving
spec:
  {{- if not $s.autoscaling.enabled }}
  replicas: {{ $s.replicas }}
  {{- end }}
  revisionHistoryLimit: 3
  strategy:
    type: RollingUpdate
    rollingUpdate:
      # GPUs are scarce: replace one pod at a time without a surge pod
      maxSurge: 0
      maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "colossal-rlhf.servingSelectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "colossal-rlhf.servingSelectorLabels" . | nindent 8 }}
      annotations:
        checksum/config: {{ include "colossal-rlhf.serveConfig" . | sha256sum }}
        {{- with $s.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "colossal-rlhf.serviceAccountName" . }}
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 60
      {{- include "colossal-rlhf.podCommon" . | nindent 6 }}
      {{- include "colossal-rlhf.gpuRuntime" . | nindent 6 }}
      {{- include "colossal-rlhf.servingScheduling" . | nindent 6 }}
      {{- with include "colossal-rlhf.servingInitContainers" . }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: serving
          image: {{ include "colossal-rlhf.image" .Values.images.serving }}
          imagePullPolicy: {{ .Values.images.serving.pullPolicy }}
          command: [python, -m, serving]
          args: [--config, /etc/colossal-rlhf/serve/serve.yaml]
          ports:
            - {name: http, containerPort: {{ $s.port }}, protocol: TCP}
            - {name: ray-metrics, containerPort: 8080, protocol: TCP}
          env:
            {{- include "colossal-rlhf.servingEnv" . | nindent 12 }}
          {{- include "colossal-rlhf.servingProbes" . | nindent 10 }}
          securityContext:
            {{- include "colossal-rlhf.securityContext" . | nindent 12 }}
          resources:
            {{- include "colossal-rlhf.servingResources" . | nindent 12 }}
          volumeMounts:
            {{- include "colossal-rlhf.servingVolumeMounts" . | nindent 12 }}
      volumes:
        {{- include "colossal-rlhf.servingVolumes" . | nindent 8 }}
{{- end }}
