{{/*
The objects of one stage, created by the orchestrator (job-pipeline.yaml) in order when the stage before has
finished, so no GPU pod exists while it would only wait. A stage pod runs the stage CLI with --resume, so a
retried pod continues from the newest checkpoint on the PVC; a stage whose manifest.json exists is complete and
exits at once (unless training.rerunCompleted). Multi-node stages are Indexed Jobs behind a headless Service.
*/}}
{{- define "colossal-rlhf.stageObjects" -}}
{{- $ := index . 0 }}
{{- $name := index . 1 }}
{{- $t := $.Values.training }}
{{- $s := index $t.stages $name }}
{{- $fullname := include "colossal-rlhf.fullname" $ }}
{{- $nodes := include "colossal-rlhf.stageNodes" (list $ $name) | int }}
{{- $gpus := int $s.gpusPerNode }}
{{- $job := printf "%s-%s" $fullname $name }}
{{- $outDir := include "colossal-rlhf.stageDir" (list $ $name) }}
{{- $module := include "colossal-rlhf.stageModule" $name }}
{{- $launch := printf "python -m %s" $module }}
{{- if gt $nodes 1 }}
{{- $launch = printf "torchrun --nnodes=%d --nproc-per-node=%d --node-rank=\"${JOB_COMPLETION_INDEX}\" --master-addr=%s-0.%s --master-port=%d -m %s" $nodes $gpus $job $job (int $t.rendezvousPort) $module }}
{{- else if gt $gpus 1 }}
{{- $launch = printf "torchrun --standalone --nnodes=1 --nproc-per-node=%d -m %s" $gpus $module }}
{{- end }}
{{- if gt $nodes 1 }}
# Headless Service: stable DNS names <job>-<index>.<job> for the torchrun rendezvous of the Indexed Job.
apiVersion: v1
kind: Service
metadata:
  name: {{ $job }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "colossal-rlhf.labels" $ | nindent 4 }}
    app.kubernetes.io/component: training
    colossal-rlhf/stage: {{ $name }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "colossal-rlhf.selectorLabels" $ | nindent 4 }}
    app.kubernetes.io/component: training
    colossal-rlhf/stage: {{ $name }}
  ports:
    - name: rendezvous
      port: {{ $t.rendezvousPort }}
      targetPort: rendezvous
---
{{- end }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ $job }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "colossal-rlhf.labels" $ | nindent 4 }}
    app.kubernetes.io/component: training
    colossal-rlhf/stage: {{ $name }}
    colossal-rlhf/run: {{ $.Values.runName }}
  {{- include "colossal-rlhf.volumePermissionsSkip" $ | nindent 2 }}
spec:
  backoffLimit: {{ $t.backoffLimit }}
  {{- with $t.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ . }}
  {{- end }}
  {{- with $t.ttlSecondsAfterFinished }}
  ttlSecondsAfterFinished: {{ . }}
  {{- end }}
  {{- if gt $nodes 1 }}
  completionMode: Indexed
  completions: {{ $nodes }}
  parallelism: {{ $nodes }}
  {{- end }}
  podFailurePolicy:
    rules:
      # exit 2 = a config or dataset error, 28 = the disk is full (training.runner.run_cli): retrying cannot help
      - action: FailJob
        onExitCodes:
          containerName: {{ $name }}
          operator: In
          values: [2, 28]
      # evictions, preemption and node drains do not count against backoffLimit
      - action: Ignore
        onPodConditions:
          - type: DisruptionTarget
            status: "True"
  template:
    metadata:
      labels:
        {{- include "colossal-rlhf.selectorLabels" $ | nindent 8 }}
        app.kubernetes.io/component: training
        colossal-rlhf/stage: {{ $name }}
      annotations:
        checksum/config: {{ include "colossal-rlhf.stageConfig" (list $ $name) | sha256sum }}
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "colossal-rlhf.serviceAccountName" $ }}
      automountServiceAccountToken: false
      {{- if gt $nodes 1 }}
      subdomain: {{ $job }}
      {{- end }}
      {{- include "colossal-rlhf.podCommon" $ | nindent 6 }}
      {{- include "colossal-rlhf.gpuRuntime" $ | nindent 6 }}
      {{- with (merge (deepCopy $s.nodeSelector) $t.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (concat $t.tolerations $s.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $t.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "colossal-rlhf.volumePermissions" (list $ $.Values.images.training) }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ include "colossal-rlhf.image" $.Values.images.training }}
          imagePullPolicy: {{ $.Values.images.training.pullPolicy }}
          workingDir: {{ $.Values.artifacts.mountPath }}
          command: [/bin/sh, -ec]
          args:
            - |
              if [ -f "$STAGE_OUTPUT_DIR/manifest.json" ] && [ "$RERUN_COMPLETED" != "true" ]; then
                echo "{{ $name }}: already complete ($STAGE_OUTPUT_DIR/manifest.json); set training.rerunCompleted to run it again"
                exit 0
              fi
              exec {{ $launch }} --config /etc/colossal-rlhf/{{ $name }}.yaml --resume
          env:
            - name: STAGE_OUTPUT_DIR
              value: {{ $outDir }}
            - name: RERUN_COMPLETED
              value: {{ $t.rerunCompleted | quote }}
            {{- if gt $nodes 1 }}
            - name: NCCL_SOCKET_IFNAME
              value: eth0
            {{- end }}
            {{- include "colossal-rlhf.cacheEnv" (list $ false) | nindent 12 }}
            {{- with $t.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- if gt $nodes 1 }}
          ports:
            - name: rendezvous
              containerPort: {{ $t.rendezvousPort }}
          {{- end }}
          securityContext:
            {{- include "colossal-rlhf.securityContext" $ | nindent 12 }}
          resources:
            {{- $res := deepCopy $s.resources }}
            {{- $limits := merge (dict "nvidia.com/gpu" $gpus) (default dict $res.limits) }}
            {{- $requests := merge (dict "nvidia.com/gpu" $gpus) (default dict $res.requests) }}
            {{- toYaml (dict "limits" $limits "requests" $requests) | nindent 12 }}
          volumeMounts:
            - {name: artifacts, mountPath: {{ $.Values.artifacts.mountPath }}}
            - {name: config, mountPath: /etc/colossal-rlhf, readOnly: true}
            - {name: tmp, mountPath: /tmp}
            - {name: dshm, mountPath: /dev/shm}
            {{- if $.Values.huggingface.tokenSecret }}
            - {name: hf-token, mountPath: /etc/colossal-rlhf/hf-token, readOnly: true}
            {{- end }}
      volumes:
        - name: artifacts
          persistentVolumeClaim:
            claimName: {{ include "colossal-rlhf.pvcName" $ }}
        - name: config
          configMap:
            name: {{ $fullname }}-training
            items:
              - {key: {{ $name }}.yaml, path: {{ $name }}.yaml}
        - name: tmp
          emptyDir: {}
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $t.shmSize }}
        {{- if $.Values.huggingface.tokenSecret }}
        - name: hf-token
          secret:
            secretName: {{ $.Values.huggingface.tokenSecret }}
            defaultMode: 0440
        {{- end }}
{{- end }}

{{/* CPU-only Job fetching training.downloads into the PVC before the first stage (no GPU held while downloading). */}}
{{- define "colossal-rlhf.fetchJob" -}}
{{- $t := .Values.training }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "colossal-rlhf.fullname" . }}-fetch
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "colossal-rlhf.labels" . | nindent 4 }}
    app.kubernetes.io/component: training
    colossal-rlhf/stage: fetch
    colossal-rlhf/run: {{ .Values.runName }}
  {{- include "colossal-rlhf.volumePermissionsSkip" . | nindent 2 }}
spec:
  backoffLimit: {{ $t.backoffLimit }}
  {{- with $t.ttlSecondsAfterFinished }}
  ttlSecondsAfterFinished: {{ . }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "colossal-rlhf.selectorLabels" . | nindent 8 }}
        app.kubernetes.io/component: training
        colossal-rlhf/stage: fetch
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "colossal-rlhf.serviceAccountName" . }}
      automountServiceAccountToken: false
      {{- include "colossal-rlhf.podCommon" . | nindent 6 }}
      {{- with include "colossal-rlhf.volumePermissions" (list . .Values.images.training) }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: fetch
          image: {{ include "colossal-rlhf.image" .Values.images.training }}
          imagePullPolicy: {{ .Values.images.training.pullPolicy }}
          command: [/bin/sh, -ec]
          args:
            - |
              {{- range $d := $t.downloads }}
              python /opt/colossal-rlhf/stagectl.py fetch {{ $d.source | squote }} {{ include "colossal-rlhf.onPvc" (list $ $d.dest) | squote }}
              {{- with $d.sha256 }} --sha256={{ . }}{{ end }}{{ with $d.repoType }} --repo-type={{ . }}{{ end }}
              {{- end }}
          env:
            {{- include "colossal-rlhf.cacheEnv" (list . false) | nindent 12 }}
          securityContext:
            {{- include "colossal-rlhf.securityContext" . | nindent 12 }}
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
      volumes:
        - name: artifacts
          persistentVolumeClaim:
            claimName: {{ include "colossal-rlhf.pvcName" . }}
        - name: scripts
          configMap:
            name: {{ include "colossal-rlhf.fullname" . }}-scripts
        - name: tmp
          emptyDir: {}
        {{- if .Values.huggingface.tokenSecret }}
        - name: hf-token
          secret:
            secretName: {{ .Values.huggingface.tokenSecret }}
            defaultMode: 0440
        {{- end }}
{{- end }}
