{{/*
Names. The chart name, overridable with nameOverride.
*/}}
{{- define "realtime-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name (63 characters at most: some Kubernetes name fields are DNS labels).
The release name is used alone when it already contains the chart name.
*/}}
{{- define "realtime-gateway.fullname" -}}
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

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "realtime-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels shared by every object of the release (no component).
*/}}
{{- define "realtime-gateway.baseLabels" -}}
helm.sh/chart: {{ include "realtime-gateway.chart" . }}
app.kubernetes.io/name: {{ include "realtime-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: realtime-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of the gateway pods. Selectors are immutable: never add a label that changes
between releases (such as helm.sh/chart) here.
*/}}
{{- define "realtime-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "realtime-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/*
Labels of the gateway's objects.
*/}}
{{- define "realtime-gateway.labels" -}}
{{ include "realtime-gateway.baseLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/*
Annotations of every object: commonAnnotations merged over the object's own (a dict passed
as "extra"). Renders nothing when both are empty. Call with (dict "ctx" $ "extra" $map).
*/}}
{{- define "realtime-gateway.annotations" -}}
{{- $all := merge (dict) (deepCopy (default (dict) .extra)) (deepCopy (default (dict) .ctx.Values.commonAnnotations)) }}
{{- with $all }}{{ dict "annotations" . | toYaml }}{{ end }}
{{- end }}

{{/*
The ServiceAccount name.
*/}}
{{- define "realtime-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "realtime-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The gateway image: repository@digest when a digest is set, else repository:tag (tag defaults
to the chart appVersion).
*/}}
{{- define "realtime-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Trial Redis: names and labels.
*/}}
{{- define "realtime-gateway.redis.fullname" -}}
{{- printf "%s-redis" (include "realtime-gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "realtime-gateway.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "realtime-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "realtime-gateway.redis.labels" -}}
{{ include "realtime-gateway.baseLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{/*
The Redis URL the gateway uses: redis.url, else the trial Redis, else empty (in-process limits).
*/}}
{{- define "realtime-gateway.redisUrl" -}}
{{- if .Values.redis.url }}
{{- .Values.redis.url }}
{{- else if .Values.redis.trial.enabled }}
{{- printf "redis://%s:6379/0" (include "realtime-gateway.redis.fullname" .) }}
{{- end }}
{{- end }}

{{/*
redis.expected_replicas: redis.expectedReplicas when set, else autoscaling.minReplicas with an
HPA, else replicaCount.
*/}}
{{- define "realtime-gateway.expectedReplicas" -}}
{{- if gt (int .Values.redis.expectedReplicas) 0 }}
{{- int .Values.redis.expectedReplicas }}
{{- else if .Values.autoscaling.enabled }}
{{- int .Values.autoscaling.minReplicas }}
{{- else }}
{{- max 1 (int .Values.replicaCount) }}
{{- end }}
{{- end }}

{{/*
The gateway config file (CONTRACT §2) as YAML: .Values.config with the keys the chart owns
set from the chart's values, so the listener ports, the drain time and the Redis URL cannot
disagree with the Service, the probes, the grace period and the trial Redis.
*/}}
{{- define "realtime-gateway.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $server := deepCopy (default (dict) $cfg.server) }}
{{- $_ := set $server "port" (int .Values.service.port) }}
{{- $_ := set $server "metrics_port" (int .Values.metrics.port) }}
{{- $_ := set $server "drain_seconds" (int .Values.drain.seconds) }}
{{- $_ := set $cfg "server" $server }}
{{- $url := include "realtime-gateway.redisUrl" . }}
{{- if $url }}
{{- $redis := deepCopy (default (dict) $cfg.redis) }}
{{- $_ := set $redis "url" $url }}
{{- $_ := set $redis "expected_replicas" (int (include "realtime-gateway.expectedReplicas" .)) }}
{{- $_ := set $cfg "redis" $redis }}
{{- else }}
{{- $_ := unset $cfg "redis" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Env var names the gateway reads secrets from: every upstream's api_key_env, every tenant's
auth.introspection.client_secret_env and client_secrets.signing_key_env, deduplicated and
sorted, comma-separated.
*/}}
{{- define "realtime-gateway.secretEnvNames" -}}
{{- $names := dict }}
{{- range $name, $upstream := .Values.config.upstreams }}
{{- $_ := set $names $upstream.api_key_env "" }}
{{- end }}
{{- range $tenant := .Values.config.tenants }}
{{- with (dig "auth" "introspection" "client_secret_env" "" $tenant) }}
{{- $_ := set $names . "" }}
{{- end }}
{{- end }}
{{- with .Values.config.client_secrets }}
{{- $_ := set $names (.signing_key_env | default "REALTIME_GATEWAY_SECRET_KEY") "" }}
{{- end }}
{{- keys $names | sortAlpha | join "," }}
{{- end }}

{{/*
Probe scheme: HTTPS when the gateway serves TLS itself.
*/}}
{{- define "realtime-gateway.probeScheme" -}}
{{- if and .Values.config.server .Values.config.server.tls_cert_file }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: preStop sleep + drain + margin.
*/}}
{{- define "realtime-gateway.terminationGracePeriodSeconds" -}}
{{- add (int .Values.drain.preStopSleepSeconds) (int .Values.drain.seconds) (int .Values.drain.marginSeconds) }}
{{- end }}

{{/*
Checks the values a JSON schema cannot express; `fail` stops the render with the reason.
*/}}
{{- define "realtime-gateway.validate" -}}
{{- if eq (int .Values.service.port) (int .Values.metrics.port) }}
{{- fail "service.port and metrics.port must differ: /metrics is served on its own port" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and (ne (toString .Values.workers) "1") (not (include "realtime-gateway.redisUrl" .)) }}
{{- fail "workers other than 1 needs Redis (redis.url or redis.trial.enabled): without it each worker process would keep its own limits" }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.trial.enabled }}
{{- fail "redis.url and redis.trial.enabled are exclusive: use an external Redis or the trial one" }}
{{- end }}
{{- range $index, $tenant := .Values.config.tenants }}
{{- range $model, $route := $tenant.models }}
{{- if not (hasKey $.Values.config.upstreams $route.upstream) }}
{{- fail (printf "config.tenants.%d.models.%s.upstream: unknown upstream %q (config.upstreams: %s)" $index $model $route.upstream (keys $.Values.config.upstreams | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
