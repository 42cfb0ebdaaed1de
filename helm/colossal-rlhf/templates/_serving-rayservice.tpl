{{/* The KubeRay RayService: a Helm object, or created by the orchestrator once the model exists. */}}
{{- define "colossal-rlhf.rayService" -}}
{{- $s := .Values.serving }}
{{- $r := $s.rayService }}
{{- if lt (int $s.maxOngoingRequests) (add $s.maxNumSeqs $s.maxWaiting | int) }}
{{- fail "serving.maxOngoingRequests must be at least serving.maxNumSeqs + serving.maxWaiting" }}
{{- end }}
{{- $cfg := include "colossal-rlhf.serveConfig" . | fromYaml }}
{{- $app := dict "name" "llm" "route_prefix" "/" "import_path" $r.importPath "args" $cfg }}
{{- $serve := dict "http_options" (dict "host" "0.0.0.0" "port" ($s.port | int)) "applications" (list $app) }}
# KubeRay RayService: a Ray cluster (CPU head, GPU workers) running the Ray Serve app; needs the KubeRay operator.
apiVersion: ray.io/v1
kind: RayService
metadata:
  name: {{ include "colossal-rlhf.fullname" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "colossal-rlhf.labels" . | nindent 4 }}
    app.kubernetes.io/component: serving
spec:
  # a changed rayClusterConfig starts a new cluster and moves traffic once its app is ready (KubeRay >= 1.2;
  # the older *UnhealthySecondThreshold fields are deprecated and ignored)
  upgradeStrategy:
    type: {{ $r.upgradeStrategy }}
  excludeHeadPodFromServeSvc: true
  serveConfigV2: |
    {{- toYaml $serve | nindent 4 }}
  rayClusterConfig:
    rayVersion: {{ $r.rayVersion | quote }}
    enableInTreeAutoscaling: {{ $s.autoscaling.enabled }}
    {{- if $s.autoscaling.enabled }}
    autoscalerOptions:
      # a worker left without a replica is removed after this long (its Serve proxy is gone, so it serves nothing)
      idleTimeoutSeconds: {{ $r.workers.idleTimeoutSeconds }}
      resources:
        requests: {cpu: 200m, memory: 512Mi}
        limits: {cpu: "1", memory: 1Gi}
      securityContext:
        {{- include "colossal-rlhf.securityContext" . | nindent 8 }}
    {{- end }}
    headGroupSpec:
      rayStartParams:
        num-gpus: "0"
        dashboard-host: "0.0.0.0"
        metrics-export-port: "8080"
      template:
        metadata:
          labels:
            {{- include "colossal-rlhf.selectorLabels" . | nindent 12 }}
            app.kubernetes.io/component: serving-head
        spec:
          serviceAccountName: {{ include "colossal-rlhf.serviceAccountName" . }}
          # the in-tree autoscaler runs as a sidecar of the head and scales worker pods through the API server
          # (KubeRay binds its Role to this ServiceAccount); without autoscaling the head needs no token
          automountServiceAccountToken: {{ $s.autoscaling.enabled }}
          {{- include "colossal-rlhf.podCommon" . | nindent 10 }}
          containers:
            - name: ray-head
              image: {{ include "colossal-rlhf.image" .Values.images.serving }}
              imagePullPolicy: {{ .Values.images.serving.pullPolicy }}
              ports:
                - {name: gcs-server, containerPort: 6379}
                - {name: dashboard, containerPort: 8265}
                - {name: client, containerPort: 10001}
                - {name: serve, containerPort: {{ $s.port }}}
                - {name: metrics, containerPort: 8080}
              env:
                {{- include "colossal-rlhf.servingEnv" . | nindent 16 }}
              securityContext:
                {{- include "colossal-rlhf.securityContext" . | nindent 16 }}
              resources:
                {{- toYaml $r.head.resources | nindent 16 }}
              volumeMounts:
                {{- include "colossal-rlhf.servingVolumeMounts" . | nindent 16 }}
          volumes:
            {{- include "colossal-rlhf.servingVolumes" . | nindent 12 }}
    workerGroupSpecs:
      - groupName: gpu
        replicas: {{ ternary $r.workers.minReplicas $s.replicas $s.autoscaling.enabled }}
        minReplicas: {{ $r.workers.minReplicas }}
        maxReplicas: {{ $r.workers.maxReplicas }}
        rayStartParams:
          metrics-export-port: "8080"
        template:
          metadata:
            labels:
              {{- include "colossal-rlhf.servingSelectorLabels" . | nindent 14 }}
            {{- with $s.podAnnotations }}
            annotations:
              {{- toYaml . | nindent 14 }}
            {{- end }}
          spec:
            serviceAccountName: {{ include "colossal-rlhf.serviceAccountName" . }}
            automountServiceAccountToken: false
            {{- include "colossal-rlhf.podCommon" . | nindent 12 }}
            {{- include "colossal-rlhf.gpuRuntime" . | nindent 12 }}
            {{- include "colossal-rlhf.servingScheduling" . | nindent 12 }}
            {{- with include "colossal-rlhf.servingInitContainers" . }}
            initContainers:
              {{- . | nindent 14 }}
            {{- end }}
            containers:
              - name: ray-worker
                image: {{ include "colossal-rlhf.image" .Values.images.serving }}
                imagePullPolicy: {{ .Values.images.serving.pullPolicy }}
                ports:
                  - {name: http, containerPort: {{ $s.port }}, protocol: TCP}
                  - {name: metrics, containerPort: 8080, protocol: TCP}
                env:
                  {{- include "colossal-rlhf.servingEnv" . | nindent 18 }}
                  # each pod's Serve proxy answers from its own replica (one per pod), so /metrics on a pod is
                  # that replica's and Prometheus sees every replica separately (no interleaved counters)
                  - {name: RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING, value: "1"}
                # no probes on /health here: a worker without a replica runs no Serve proxy; KubeRay adds its
                # own Ray health probes to worker pods
                securityContext:
                  {{- include "colossal-rlhf.securityContext" . | nindent 18 }}
                resources:
                  {{- include "colossal-rlhf.servingResources" . | nindent 18 }}
                volumeMounts:
                  {{- include "colossal-rlhf.servingVolumeMounts" . | nindent 18 }}
            volumes:
              {{- include "colossal-rlhf.servingVolumes" . | nindent 14 }}
{{- end }}
