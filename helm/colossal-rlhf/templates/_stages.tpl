{{/* Training stages in pipeline order, and the chart-filled wiring of their configs.
`training.alignment` picks the stage after SFT: ppo (with a reward model), grpo (with a reward model) or dpo
(preference pairs directly, no reward model). */}}
{{- define "colossal-rlhf.stageOrder" -}}
{{- $a := .Values.training.alignment }}
{{- if eq $a "dpo" }}sft dpo quantize{{ else }}sft rm {{ $a }} quantize{{ end }}
{{- end }}

{{/* Enabled stages in order, space separated. */}}
{{- define "colossal-rlhf.enabledStages" -}}
{{- $out := list }}
{{- range $name := splitList " " (include "colossal-rlhf.stageOrder" .) }}
{{- if (index $.Values.training.stages $name).enabled }}{{ $out = append $out $name }}{{ end }}
{{- end }}
{{- join " " $out }}
{{- end }}

{{- define "colossal-rlhf.stageModule" -}}
{{- printf "training.%s" . }}
{{- end }}

{{/* Pods of a stage: `nodes` (quantize always runs on one). */}}
{{- define "colossal-rlhf.stageNodes" -}}
{{- $s := index (index . 0).Values.training.stages (index . 1) }}
{{- ternary 1 $s.nodes (eq (index . 1) "quantize") | int }}
{{- end }}

{{/* "true" when some enabled stage runs on several nodes (it then needs a ReadWriteMany volume). */}}
{{- define "colossal-rlhf.multiNode" -}}
{{- range $name := splitList " " (include "colossal-rlhf.enabledStages" .) }}
{{- if gt (include "colossal-rlhf.stageNodes" (list $ $name) | int) 1 }}true{{ end }}
{{- end }}
{{- end }}

{{/* The stage config: the user's values with checkpoint.output_dir and upstream model paths filled in. */}}
{{- define "colossal-rlhf.stageConfig" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $cfg := deepCopy (index $root.Values.training.stages $name).config }}
{{- $sft := include "colossal-rlhf.stageDir" (list $root "sft") }}
{{- $rm := include "colossal-rlhf.stageDir" (list $root "rm") }}
{{- $aligned := include "colossal-rlhf.stageDir" (list $root $root.Values.training.alignment) }}
{{- $model := default dict $cfg.model }}
{{- if has $name (list "rm" "ppo" "dpo" "grpo") }}{{ $_ := set $model "path" (default (printf "%s/model" $sft) $model.path) }}{{ end }}
{{- if has $name (list "ppo" "grpo") }}
{{- $opts := default dict (get $cfg $name) }}
{{- $_ := set $opts "reward_model_path" (default (printf "%s/model" $rm) $opts.reward_model_path) }}
{{- $_ := set $cfg $name $opts }}
{{- end }}
{{- if eq $name "quantize" }}{{ $_ := set $model "path" (default $aligned $model.path) }}{{ end }}
{{- $_ := set $cfg "model" $model }}
{{- $ckpt := default dict $cfg.checkpoint }}
{{- $_ := set $ckpt "output_dir" (include "colossal-rlhf.stageDir" (list $root $name)) }}
{{- $_ := set $cfg "checkpoint" $ckpt }}
{{- toYaml $cfg }}
{{- end }}

{{/* The pipeline config the orchestrator runs (training.pipeline with the kubernetes launcher). */}}
{{- define "colossal-rlhf.pipelineConfig" -}}
{{- $stages := list }}
{{- range $name := splitList " " (include "colossal-rlhf.enabledStages" .) }}
{{- $stages = append $stages (dict "name" $name "config" (printf "/etc/colossal-rlhf/training/%s.yaml" $name) "launcher" "kubernetes") }}
{{- end }}
{{- toYaml (dict "name" (include "colossal-rlhf.fullname" .) "run_dir" "/tmp/pipeline" "launcher" "kubernetes" "stages" $stages) }}
{{- end }}

{{/* Serving is started by the orchestrator once the pipeline has produced the model (it holds no GPU before). */}}
{{- define "colossal-rlhf.servingOrchestrated" -}}
{{- $m := .Values.serving.model }}
{{- if and .Values.training.enabled .Values.serving.enabled $m.waitForManifest (not $m.download) }}true{{ end }}
{{- end }}

{{/* The orchestrator Job's name: <fullname>-pipeline-<checksum of what it runs> (an upgrade that changes it reruns). */}}
{{- define "colossal-rlhf.orchestratorName" -}}
{{- $rev := print (include (print $.Template.BasePath "/configmap-pipeline.yaml") .) (include (print $.Template.BasePath "/configmap-training.yaml") .) | sha256sum | trunc 8 }}
{{- printf "%s-pipeline-%s" (include "colossal-rlhf.fullname" .) $rev }}
{{- end }}
