{{/*
Chart name, truncated to the 63 characters Kubernetes allows in a label.
*/}}
{{- define "embedding-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart> unless the release name already contains it.
*/}}
{{- define "embedding-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "embedding-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels shared by everything the release renders (no component: the Job's pods must not match
the Deployment's selector, the Service or the PodDisruptionBudget).
*/}}
{{- define "embedding-worker.baseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "embedding-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector of the worker pods (Deployment, Service, PodDisruptionBudget, ServiceMonitor). */}}
{{- define "embedding-worker.selectorLabels" -}}
{{ include "embedding-worker.baseSelectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "embedding-worker.commonLabels" -}}
helm.sh/chart: {{ include "embedding-worker.chart" . }}
{{ include "embedding-worker.baseSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: embedding-worker
{{- end }}

{{/* Labels of the worker's objects. */}}
{{- define "embedding-worker.labels" -}}
{{ include "embedding-worker.commonLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "embedding-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The most replicas worth running: one per partition of the input topic.
*/}}
{{- define "embedding-worker.maxReplicas" -}}
{{- $max := .max | default .root.Values.inputTopicPartitions }}
{{- int $max }}
{{- end }}

{{/*
A value as the string the worker parses. Numbers from values files arrive as float64, which
toString would print as 1e+06: whole numbers are printed as integers.
*/}}
{{- define "embedding-worker.string" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . | toString }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Non-secret settings: the `env` map plus the probe port and bind address (taken from
containerPort and bindAddress so that the probes and the Service cannot disagree with them). Rendered as the ConfigMap's data and, for the migration Job, inline.
*/}}
{{- define "embedding-worker.configData" -}}
{{- $data := dict }}
{{- range $key, $value := .Values.env }}
{{- $_ := set $data $key (include "embedding-worker.string" $value) }}
{{- end }}
{{- $_ := set $data "EMBEDDING_WORKER_HTTP__PORT" (toString .Values.containerPort) }}
{{- $_ := set $data "EMBEDDING_WORKER_HTTP__HOST" (toString .Values.bindAddress) }}
{{- if .Values.tracing.enabled }}
{{- $_ := set $data "EMBEDDING_WORKER_TRACING__ENABLED" "true" }}
{{- with .Values.tracing.endpoint }}
{{- $_ := set $data "EMBEDDING_WORKER_TRACING__ENDPOINT" (toString .) }}
{{- end }}
{{- if not (kindIs "invalid" .Values.tracing.sampleRatio) }}
{{- $_ := set $data "EMBEDDING_WORKER_TRACING__SAMPLE_RATIO" (toString .Values.tracing.sampleRatio) }}
{{- end }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{/*
Secrets, always by reference to the existing Secret (the chart never renders secret values).
*/}}
{{- define "embedding-worker.secretEnv" -}}
- name: EMBEDDING_WORKER_POSTGRES__DSN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.postgresDsnKey }}
{{- if .Values.existingSecret.apiKeyKey }}
- name: DASHSCOPE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.apiKeyKey }}
      optional: {{ .Values.existingSecret.apiKeyOptional }}
{{- end }}
{{- if .Values.existingSecret.kafkaSaslPasswordKey }}
- name: EMBEDDING_WORKER_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret.name }}
      key: {{ .Values.existingSecret.kafkaSaslPasswordKey }}
      optional: {{ .Values.existingSecret.kafkaSaslPasswordOptional }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod-level fields shared by the Deployment and the migration Job.
*/}}
{{- define "embedding-worker.podSpecCommon" -}}
# The worker never talks to the Kubernetes API.
automountServiceAccountToken: false
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The volumes of both pods: a writable /tmp (the root filesystem is read-only) + extras. */}}
{{- define "embedding-worker.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "embedding-worker.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The analysis stage is on when an analysis file is given, inline (analysis.file, rendered into
the chart's ConfigMap) or in a ConfigMap made outside the chart (analysis.existingConfigMap).
*/}}
{{- define "embedding-worker.analysis.enabled" -}}
{{- if or .Values.analysis.file .Values.analysis.existingConfigMap }}true{{ end }}
{{- end }}

{{- define "embedding-worker.analysis.configMapName" -}}
{{- .Values.analysis.existingConfigMap | default (printf "%s-analysis" (include "embedding-worker.fullname" .)) }}
{{- end }}

{{/* Where the worker reads the analysis file (EMBEDDING_WORKER_ANALYSIS__FILE). */}}
{{- define "embedding-worker.analysis.path" -}}
{{- printf "%s/%s" .Values.analysis.mountPath .Values.analysis.fileName }}
{{- end }}

{{/* The inline analysis ConfigMap's data: the analysis file plus the files next to it. */}}
{{- define "embedding-worker.analysis.data" -}}
{{- $data := dict .Values.analysis.fileName (.Values.analysis.file | default "") }}
{{- range $name, $content := .Values.analysis.examples | default dict }}
{{- $_ := set $data $name $content }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{/*
What the worker produces results to (its settings from `env`, else its defaults).
*/}}
{{- define "embedding-worker.analysis.classificationsTopic" -}}
{{- get .Values.env "EMBEDDING_WORKER_ANALYSIS__CLASSIFICATIONS_TOPIC" | default "content.classifications" }}
{{- end }}
{{- define "embedding-worker.analysis.anomaliesTopic" -}}
{{- get .Values.env "EMBEDDING_WORKER_ANALYSIS__ANOMALIES_TOPIC" | default "content.anomalies" }}
{{- end }}

{{/*
Analysis values that values.schema.json cannot check, or whose schema message is unclear.
*/}}
{{- define "embedding-worker.validateAnalysis" -}}
{{- $a := .Values.analysis }}
{{- $examples := $a.examples | default dict }}
{{- if and $a.file $a.existingConfigMap }}
{{- fail "analysis.file and analysis.existingConfigMap are mutually exclusive: give the analysis file inline (the chart renders its ConfigMap) or name a ConfigMap made outside the chart, not both." }}
{{- end }}
{{- if and $examples (not $a.file) }}
{{- fail "analysis.examples are files next to analysis.file in the chart's ConfigMap: set analysis.file too (with analysis.existingConfigMap, put them in that ConfigMap)." }}
{{- end }}
{{- if hasKey $examples $a.fileName }}
{{- fail (printf "analysis.examples has a file named %s, the analysis file's own name (analysis.fileName): rename one of them." $a.fileName) }}
{{- end }}
{{- if include "embedding-worker.analysis.enabled" . }}
{{- range $key, $_ := .Values.env }}
{{- if or (eq $key "EMBEDDING_WORKER_ANALYSIS__FILE") (hasPrefix "EMBEDDING_WORKER_ANALYSIS__NAMESPACES" $key) }}
{{- fail (printf "env.%s conflicts with the analysis file the chart mounts (analysis.file / analysis.existingConfigMap): the worker takes analysis.file or analysis.namespaces, not both. Remove it." $key) }}
{{- end }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if or (eq (toString .name) "EMBEDDING_WORKER_ANALYSIS__FILE") (hasPrefix "EMBEDDING_WORKER_ANALYSIS__NAMESPACES" (toString .name)) }}
{{- fail (printf "extraEnv %s conflicts with the analysis file the chart mounts (analysis.file / analysis.existingConfigMap). Remove it." .name) }}
{{- end }}
{{- end }}
{{- range .Values.extraVolumes }}
{{- if eq (toString .name) "analysis" }}
{{- fail "extraVolumes has a volume named analysis, the name of the chart's analysis volume: rename it." }}
{{- end }}
{{- end }}
{{- range .Values.extraVolumeMounts }}
{{- if eq (toString .mountPath | trimSuffix "/") $a.mountPath }}
{{- fail (printf "analysis.mountPath %s is also an extraVolumeMounts mountPath: choose another directory." $a.mountPath) }}
{{- end }}
{{- end }}
{{- if eq $a.mountPath "/tmp" }}
{{- fail "analysis.mountPath /tmp would hide the worker's writable /tmp: choose another directory." }}
{{- end }}
{{- $input := get .Values.env "EMBEDDING_WORKER_KAFKA__INPUT_TOPIC" | default "content.events" }}
{{- range $name, $topic := dict "EMBEDDING_WORKER_ANALYSIS__CLASSIFICATIONS_TOPIC" (include "embedding-worker.analysis.classificationsTopic" $) "EMBEDDING_WORKER_ANALYSIS__ANOMALIES_TOPIC" (include "embedding-worker.analysis.anomaliesTopic" $) }}
{{- if eq $topic (toString $input) }}
{{- fail (printf "%s is the input topic %s: the worker would consume its own results. Use another topic." $name $topic) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $a.file }}
{{- /* A relative examples_file is read next to the analysis file: it must be one of the
     ConfigMap's files. TOML is not parsed here (fromToml needs Helm >= 3.17): the usual
     `examples_file = "..."` lines are matched. */}}
{{- range regexFindAll `(?m)^[ \t]*(?:[A-Za-z0-9_.-]+\.)?examples_file[ \t]*=[ \t]*["'][^"'\n]*["']` $a.file -1 }}
{{- $path := regexReplaceAll `^[^=]*=[ \t]*["']([^"'\n]*)["']$` . "${1}" }}
{{- if and (not (isAbs $path)) (contains "/" (clean $path)) }}
{{- fail (printf "analysis.file names examples_file %q: the ConfigMap's files sit in one directory next to the analysis file, so name it by a plain file name (a key of analysis.examples), or give an absolute path to a file mounted with extraVolumes." $path) }}
{{- else if and (not (isAbs $path)) (not (hasKey $examples (clean $path))) }}
{{- fail (printf "analysis.file names examples_file %q, which is read next to the analysis file: add it to analysis.examples (a key %q), or give an absolute path to a file mounted with extraVolumes." $path (clean $path)) }}
{{- end }}
{{- end }}
{{- $size := len $a.fileName | add (len $a.file) }}
{{- range $name, $content := $examples }}
{{- $size = add $size (len $name) (len $content) }}
{{- end }}
{{- if gt $size 1048576 }}
{{- fail (printf "analysis.file and analysis.examples add up to %d bytes, more than a ConfigMap holds (1 MiB): create the ConfigMap outside the chart (kubectl create configmap --from-file) and set analysis.existingConfigMap." $size) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks that values.schema.json cannot express with a clear message. Included by every
template that depends on them, so `helm template` / `install` fail before anything is applied.
*/}}
{{- define "embedding-worker.validate" -}}
{{- if and .Values.keda.enabled .Values.hpa.enabled }}
{{- fail "keda.enabled and hpa.enabled are mutually exclusive: two autoscalers would fight over the Deployment's replicas. Enable one of them." }}
{{- end }}
{{- if hasKey .Values.env "EMBEDDING_WORKER_HTTP__PORT" }}
{{- fail "env.EMBEDDING_WORKER_HTTP__PORT is set by the chart from containerPort (the probes and the Service use it too): set containerPort instead." }}
{{- end }}
{{- if hasKey .Values.env "EMBEDDING_WORKER_HTTP__HOST" }}
{{- fail "env.EMBEDDING_WORKER_HTTP__HOST is set by the chart from bindAddress: set bindAddress instead." }}
{{- end }}
{{- $bind := toString .Values.bindAddress }}
{{- if or (hasPrefix "127." $bind) (eq $bind "localhost" "::1" "0:0:0:0:0:0:0:1") }}
{{- fail (printf "bindAddress %s is a loopback address: the kubelet's probes and Prometheus connect to the pod IP and would be refused. Keep 0.0.0.0 (or :: on IPv6) and restrict access with networkPolicy.enabled." $bind) }}
{{- end }}
{{- if and .Values.networkPolicy.enabled .Values.networkPolicy.egress.restrict (not .Values.networkPolicy.egress.rules) }}
{{- fail "networkPolicy.egress.restrict without rules would cut the worker off DNS, Kafka, Postgres and the embedding API: list them in networkPolicy.egress.rules, or leave egress open (restrict: false)." }}
{{- end }}
{{- range $key := list "EMBEDDING_WORKER_POSTGRES__DSN" "DASHSCOPE_API_KEY" "EMBEDDING_WORKER_DASHSCOPE_API_KEY" "EMBEDDING_WORKER_PROVIDER__API_KEY" "EMBEDDING_WORKER_KAFKA__SASL_PASSWORD" }}
{{- if hasKey $.Values.env $key }}
{{- fail (printf "env.%s is a secret and would be stored in a ConfigMap: put it in the Secret named by existingSecret.name (see the chart's README)." $key) }}
{{- end }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set minAvailable or maxUnavailable, not both (set the other to null)." }}
{{- end }}
{{- if and .Values.hpa.enabled (not (dig "requests" "cpu" "" .Values.resources)) }}
{{- fail "hpa.enabled scales on CPU utilization, which is relative to the CPU request: set resources.requests.cpu." }}
{{- end }}
{{- if and .Values.keda.enabled (eq .Values.keda.trigger "prometheus") (lt (int .Values.keda.minReplicaCount) 1) }}
{{- fail "keda.trigger=prometheus reads a metric the worker itself exports: with no replica there is no metric to scale up from zero. Set keda.minReplicaCount >= 1 (or use the kafka trigger)." }}
{{- end }}
{{- include "embedding-worker.validateAnalysis" . }}
{{- end }}

{{/*
What the worker consumes, for the KEDA trigger: an explicit keda.kafka value, else the worker's
own setting from `env`, else the worker's default.
*/}}
{{- define "embedding-worker.kafka.bootstrapServers" -}}
{{- .Values.keda.kafka.bootstrapServers | default (get .Values.env "EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS") | default "localhost:9092" }}
{{- end }}
{{- define "embedding-worker.kafka.consumerGroup" -}}
{{- .Values.keda.kafka.consumerGroup | default (get .Values.env "EMBEDDING_WORKER_KAFKA__GROUP_ID") | default "embedding-worker" }}
{{- end }}
{{- define "embedding-worker.kafka.topic" -}}
{{- .Values.keda.kafka.topic | default (get .Values.env "EMBEDDING_WORKER_KAFKA__INPUT_TOPIC") | default "content.events" }}
{{- end }}
