{{/* Training stages in pipeline order, what each waits for, and the chart-filled wiring of their configs. */}}
{{- define "colossal-rlhf.stageOrder" -}}
sft rm ppo quantize
{{- end }}

{{- define "colossal-rlhf.stageNeeds" -}}
{{- $needs := dict "sft" (list) "rm" (list "sft") "ppo" (list "sft" "rm") "quantize" (list "ppo") }}
{{- join " " (get $needs .) }}
{{- end }}

{{- define "colossal-rlhf.stageModule" -}}
{{- printf "training.%s" . }}
{{- end }}

{{/* The stage config: the user's values with checkpoint.output_dir and upstream model paths filled in. */}}
{{- define "colossal-rlhf.stageConfig" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $cfg := deepCopy (index $root.Values.training.stages $name).config }}
{{- $sft := include "colossal-rlhf.stageDir" (list $root "sft") }}
{{- $rm := include "colossal-rlhf.stageDir" (list $root "rm") }}
{{- $ppo := include "colossal-rlhf.stageDir" (list $root "ppo") }}
{{- $model := default dict $cfg.model }}
{{- if eq $name "rm" }}{{ $_ := set $model "path" (default (printf "%s/model" $sft) $model.path) }}{{ end }}
{{- if eq $name "ppo" }}
{{- $_ := set $model "path" (default (printf "%s/model" $sft) $model.path) }}
{{- $ppoOpts := default dict (get $cfg "ppo") }}
{{- $_ := set $ppoOpts "reward_model_path" (default (printf "%s/model" $rm) $ppoOpts.reward_model_path) }}
{{- $_ := set $cfg "ppo" $ppoOpts }}
{{- end }}
{{- if eq $name "quantize" }}{{ $_ := set $model "path" (default $ppo $model.path) }}{{ end }}
{{- $_ := set $cfg "model" $model }}
{{- $ckpt := default dict $cfg.checkpoint }}
{{- $_ := set $ckpt "output_dir" (include "colossal-rlhf.stageDir" (list $root $name)) }}
{{- $_ := set $cfg "checkpoint" $ckpt }}
{{- toYaml $cfg }}
{{- end }}
