{{/* Chart name, overridable. */}}
{{- define "c2p-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. Components append
"-gateway", "-worker", "-redis", so this stays under 50 characters. */}}
{{- define "c2p-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "c2p-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway"). */}}
{{- define "c2p-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "c2p-serve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects: (dict "ctx" $ "component" "gateway"). */}}
{{- define "c2p-serve.labels" -}}
helm.sh/chart: {{ include "c2p-serve.chart" .ctx }}
{{ include "c2p-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: c2p-serve
{{- end }}

{{- define "c2p-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "c2p-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image of a flavour: (dict "ctx" $ "flavour" "cpu"|"cuda"). */}}
{{- define "c2p-serve.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag }}
{{- printf "%s:%s-%s" .ctx.Values.image.repository $tag .flavour }}
{{- end }}

{{- define "c2p-serve.workerProfile" -}}
{{- if not (has .Values.worker.profile (list "gpu" "cpu")) }}
{{- fail (printf "worker.profile must be gpu or cpu, not %q" .Values.worker.profile) }}
{{- end }}
{{- .Values.worker.profile }}
{{- end }}

{{/* The Redis URL when it is not taken from a Secret. */}}
{{- define "c2p-serve.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "c2p-serve.fullname" .) }}
{{- else if .Values.redisUrl }}
{{- .Values.redisUrl }}
{{- else if not .Values.redis.externalUrlSecret.name }}
{{- fail "redis.enabled is false: set redisUrl or redis.externalUrlSecret.name" }}
{{- end }}
{{- end }}

{{/* host:port of Redis as KEDA's operator (in another namespace) reaches it. */}}
{{- define "c2p-serve.redisAddress" -}}
{{- if .Values.keda.address }}
{{- .Values.keda.address }}
{{- else if .Values.redis.enabled }}
{{- printf "%s-redis.%s.svc:6379" (include "c2p-serve.fullname" .) .Release.Namespace }}
{{- else if .Values.redisUrl }}
{{- $url := urlParse .Values.redisUrl }}
{{- if contains ":" $url.host }}{{ $url.host }}{{ else }}{{ printf "%s:6379" $url.host }}{{ end }}
{{- else }}
{{- fail "keda.enabled with the Redis URL in a Secret: set keda.address (host:port) and keda.authenticationRef" }}
{{- end }}
{{- end }}

{{/* Grace period of a worker pod: see worker.terminationGracePeriodSeconds in values.yaml. After SIGTERM the worker
finishes its jobs (up to the drain timeout), then delivers the DICOM SEGs still queued for forwarding (up to the
drain timeout again): the floor is preStop + 2 x drain + 5 s. */}}
{{- define "c2p-serve.workerGracePeriod" -}}
{{- $w := .Values.worker }}
{{- $drain := $w.drainTimeoutSeconds | int }}
{{- $preStop := $w.preStopSleepSeconds | int }}
{{- $floor := add $preStop (mul 2 $drain) 5 }}
{{- if not $w.terminationGracePeriodSeconds }}
{{- $longest := max (mul 2 $drain) (.Values.queue.jobDeadlineSeconds | int) }}
{{- add $longest $preStop ($w.terminationMarginSeconds | int) }}
{{- else if le ($w.terminationGracePeriodSeconds | int) $floor }}
{{- fail (printf "worker.terminationGracePeriodSeconds (%v) must exceed worker.preStopSleepSeconds + 2 x worker.drainTimeoutSeconds + 5 (%d): Kubernetes would kill draining workers" $w.terminationGracePeriodSeconds $floor) }}
{{- else }}
{{- $w.terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}

{{/* Environment both components share. */}}
{{- define "c2p-serve.commonEnv" -}}
- name: C2P_HOST
  value: "0.0.0.0"
{{- if and (not .Values.redis.enabled) (not .Values.redisUrl) .Values.redis.externalUrlSecret.name }}
- name: C2P_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.externalUrlSecret.name }}
      key: {{ .Values.redis.externalUrlSecret.key }}
{{- else }}
- name: C2P_REDIS_URL
  value: {{ include "c2p-serve.redisUrl" . | quote }}
{{- end }}
- name: C2P_QUEUE__PREFIX
  value: {{ .Values.queue.prefix | quote }}
- name: C2P_QUEUE__JOB_DEADLINE_S
  value: {{ .Values.queue.jobDeadlineSeconds | quote }}
- name: C2P_WORKER__DRAIN_TIMEOUT_S
  value: {{ .Values.worker.drainTimeoutSeconds | quote }}
{{- with .Values.model }}
- name: C2P_MODEL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.tracing.endpoint }}
- name: C2P_TRACING__ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- with .Values.tracing.serviceName }}
- name: C2P_TRACING__SERVICE_NAME
  value: {{ . | quote }}
{{- end }}
{{- with .Values.tracing.sampleRatio | toString }}
- name: C2P_TRACING__SAMPLE_RATIO
  value: {{ . | quote }}
{{- end }}
{{- range $name, $value := .Values.config }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Pod-level security context of the c2p containers. */}}
{{- define "c2p-serve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsGroup }}
fsGroup: {{ .Values.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context: (dict "uid" 10001 "gid" 10001). */}}
{{- define "c2p-serve.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The TCP port of an http(s)/redis URL: explicit, else the scheme's default. */}}
{{- define "c2p-serve.urlPort" -}}
{{- $url := urlParse . }}
{{- if contains ":" $url.host }}
{{- last (splitList ":" $url.host) }}
{{- else }}
{{- get (dict "http" "80" "https" "443" "redis" "6379" "rediss" "6379") $url.scheme | default "443" }}
{{- end }}
{{- end }}

{{/* A whole number from values, as a string: (dict "value" V "name" "queue.tenantMaxPending" "min" 1). Numbers from
values files arrive as float64, from --set-string as strings; anything else would crash-loop the service. */}}
{{- define "c2p-serve.wholeNumber" -}}
{{- $ok := false }}
{{- if kindIs "string" .value }}
{{- $ok = regexMatch "^[0-9]+$" .value }}
{{- else if or (kindIs "float64" .value) (kindIs "int64" .value) (kindIs "int" .value) }}
{{- $ok = eq (float64 (int64 .value)) (float64 .value) }}
{{- end }}
{{- if or (not $ok) (lt (int64 .value) (int64 .min)) }}
{{- fail (printf "%s must be a whole number >= %d, not %v" .name (int64 .min) .value) }}
{{- end }}
{{- int64 .value }}
{{- end }}

{{/* The gateway binds 0.0.0.0 and refuses to start without credentials, so a release without any would only
crash-loop: refuse to render it. API keys or an issuer given by hand (config, gateway.extraEnv) count too. */}}
{{- define "c2p-serve.checkAuth" -}}
{{- $auth := .Values.gateway.auth }}
{{- $names := keys .Values.config }}
{{- range .Values.gateway.extraEnv }}
{{- $names = append $names .name }}
{{- end }}
{{- $byHand := false }}
{{- range list "C2P_API_KEYS" "C2P_AUTH__KEYS_FILE" "C2P_AUTH__OIDC_ISSUER" }}
{{- if has . $names }}
{{- $byHand = true }}
{{- end }}
{{- end }}
{{- if not (or $auth.keysSecret $auth.oidc.issuer $byHand) }}
{{- fail "the gateway needs credentials and refuses to start without them: set gateway.auth.keysSecret (a Secret whose key \"keys\" holds entries made by `c2p keys new --tenant NAME`) or gateway.auth.oidc.issuer and gateway.auth.oidc.audience (docs/deploy.md, \"Authentication and tenants\")" }}
{{- end }}
{{- if and $auth.oidc.issuer (not $auth.oidc.audience) }}
{{- fail "gateway.auth.oidc.issuer needs gateway.auth.oidc.audience (the aud tokens must carry): without it a token issued for another service would pass, and the gateway refuses to start" }}
{{- end }}
{{- if and (or $auth.oidc.audience $auth.oidc.jwksUrl $auth.oidc.tenantClaim) (not $auth.oidc.issuer) }}
{{- fail "gateway.auth.oidc.audience, jwksUrl and tenantClaim need gateway.auth.oidc.issuer" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (ne (toString $auth.publicMetrics) "true") }}
{{- fail "serviceMonitor.enabled with gateway.auth.publicMetrics=false: Prometheus would scrape the gateway's /metrics without credentials and be refused (401). Set gateway.auth.publicMetrics=true (the metrics carry no patient data or job ids) or scrape the gateway with a configuration of your own" }}
{{- end }}
{{- end }}
