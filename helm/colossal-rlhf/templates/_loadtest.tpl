{{/* The load-test Job: a Helm object, or run by the orchestrator once it has started serving. */}}
{{- define "colossal-rlhf.loadtestJob" -}}
{{- $out := include "colossal-rlhf.onPvc" (list . (printf "%s/%s" .Values.loadtest.outDir .Values.runName)) }}
# Load test against the API Service once it is ready (python -m loadtest); the report stays on the PVC.
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "colossal-rlhf.fullname" . }}-loadtest
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "colossal-rlhf.labels" . | nindent 4 }}
    app.kubernetes.io/component: loadtest
spec:
  backoffLimit: {{ .Values.loadtest.backoffLimit }}
  template:
    metadata:
      labels:
        {{- include "colossal-rlhf.selectorLabels" . | nindent 8 }}
        app.kubernetes.io/component: loadtest
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "colossal-rlhf.serviceAccountName" . }}
      automountServiceAccountToken: false
      {{- include "colossal-rlhf.podCommon" . | nindent 6 }}
      {{- if not (include "colossal-rlhf.sharedVolume" .) }}
      # a ReadWriteOnce volume is attached to the serving pods' node: the report is written from that node
      affinity:
        podAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            - topologyKey: kubernetes.io/hostname
              labelSelector:
                matchLabels:
                  {{- include "colossal-rlhf.servingSelectorLabels" . | nindent 18 }}
      {{- end }}
      initContainers:
        - name: wait-for-api
          image: {{ include "colossal-rlhf.image" .Values.images.serving }}
          imagePullPolicy: {{ .Values.images.serving.pullPolicy }}
          command: [python, /opt/colossal-rlhf/stagectl.py, ready, "{{ include "colossal-rlhf.apiUrl" . }}/ready"]
          securityContext:
            {{- include "colossal-rlhf.securityContext" . | nindent 12 }}
          resources:
            requests: {cpu: 50m, memory: 64Mi}
            limits: {cpu: 200m, memory: 256Mi}
          volumeMounts:
            - {name: scripts, mountPath: /opt/colossal-rlhf, readOnly: true}
      containers:
        - name: loadtest
          image: {{ include "colossal-rlhf.image" .Values.images.serving }}
          imagePullPolicy: {{ .Values.images.serving.pullPolicy }}
          command: [python, -m, loadtest]
          args:
            - --url={{ include "colossal-rlhf.apiUrl" . }}
            - --model={{ .Values.serving.servedModelName }}
            - --out={{ $out }}
            {{- range .Values.loadtest.args }}
            - {{ . | quote }}
            {{- end }}
          env:
            - {name: HOME, value: /tmp/home}
            - {name: PYTHONUNBUFFERED, value: "1"}
            {{- if include "colossal-rlhf.apiKeysEnabled" . }}
            - name: OPENAI_API_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ include "colossal-rlhf.apiKeySecretName" . }}
                  key: {{ .Values.serving.apiKeys.secretKey }}
            {{- end }}
          securityContext:
            {{- include "colossal-rlhf.securityContext" . | nindent 12 }}
          resources:
            {{- toYaml .Values.loadtest.resources | nindent 12 }}
          volumeMounts:
            - {name: artifacts, mountPath: {{ .Values.artifacts.mountPath }}}
            - {name: tmp, mountPath: /tmp}
      volumes:
        - name: artifacts
          persistentVolumeClaim:
            claimName: {{ include "colossal-rlhf.pvcName" . }}
        - name: scripts
          configMap:
            name: {{ include "colossal-rlhf.fullname" . }}-scripts
        - name: tmp
          emptyDir: {}
{{- end }}
