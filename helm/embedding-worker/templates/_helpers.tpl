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
Non-secret settings: the `env` map plus the probe port (taken from containerPort so the two
cannot disagree). Rendered as the ConfigMap's data and, for the migration Job, inline.
*/}}
{{- define "embedding-worker.configData" -}}
{{- $data := dict }}
{{- range $key, $value := .Values.env }}
{{- $_ := set $data $key (include "embedding-worker.string" $value) }}
{{- end }}
{{- $_ := set $data "EMBEDDING_WORKER_HTTP__PORT" (toString .Values.containerPort) }}
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
