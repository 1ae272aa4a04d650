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
{{- add (mul 2 $drain) $preStop ($w.terminationMarginSeconds | int) }}
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
- name: C2P_QUEUE__LEASE_S
  value: {{ .Values.queue.leaseSeconds | quote }}
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

{{/* A worker profile, checked: (dict "value" "gpu" "name" "worker.profile"). */}}
{{- define "c2p-serve.checkProfile" -}}
{{- if not (has .value (list "gpu" "cpu")) }}
{{- fail (printf "%s must be gpu or cpu, not %q" .name (toString .value)) }}
{{- end }}
{{- .value }}
{{- end }}

{{/* Lanes, checked: (dict "lanes" LIST "name" "worker.lanes" "keda" BOOL). A lane is the first 12 hex digits of a
model artifact's sha256 (service/queue/keys.py): the stream "<prefix>:jobs:<lane>" holds that model's jobs. */}}
{{- define "c2p-serve.checkLanes" -}}
{{- if not (kindIs "slice" .lanes) }}
{{- fail (printf "%s must be a list of lanes (12 lowercase hex digits each), not %v" .name .lanes) }}
{{- end }}
{{- if and .keda (not .lanes) }}
{{- fail (printf "%s is empty: KEDA scales a worker Deployment on its lanes' streams, one lane per model it serves (the first 12 hex digits of artifacts[\"model.onnx\"].sha256 in the model's card.json)" .name) }}
{{- end }}
{{- $seen := list }}
{{- range .lanes }}
{{- if not (kindIs "string" .) }}
{{- fail (printf "%s: lane %v is not a string: quote it (a lane of digits alone reads as a number)" $.name .) }}
{{- end }}
{{- if not (regexMatch "^[0-9a-f]{12}$" .) }}
{{- fail (printf "%s: lane %q must be 12 lowercase hex digits (the first 12 of the model artifact's sha256, from its card.json)" $.name .) }}
{{- end }}
{{- if has . $seen }}
{{- fail (printf "%s: lane %q is listed twice" $.name .) }}
{{- end }}
{{- $seen = append $seen . }}
{{- end }}
{{- end }}

{{/* Every worker Deployment of the release, validated, as dicts: the default worker (worker.enabled) first, then one
per entry of workerPools. (dict "ctx" $ "out" (dict)) sets .out.workers; the templates of the worker Deployments,
their ScaledObjects, PDBs, Services and NetworkPolicies all read it. Keys of each: name (of the Deployment), pool
(the pool's name; "" for the default worker), component ("worker" or "worker-pool"), selector (YAML of its pods'
selector labels), profile, replicas, resources, nodeSelector, tolerations, affinity, extraEnv, models
(C2P_WORKER__MODELS), memoryBudgetMB, repository (true: mount modelRepository, set C2P_MODEL_REPOSITORY), lanes and
keda (.Values.keda with the pool's overrides). The default worker's selector is that of earlier releases: a
Deployment's selector cannot change, and the pools' pods (component worker-pool) never match it. */}}
{{- define "c2p-serve.workers" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
{{- $w := $v.worker }}
{{- $fullname := include "c2p-serve.fullname" $ctx }}
{{- $workers := list }}
{{- if $w.enabled }}
{{- $profile := include "c2p-serve.checkProfile" (dict "value" $w.profile "name" "worker.profile") }}
{{- $p := index $w $profile }}
{{- include "c2p-serve.checkLanes" (dict "lanes" $w.lanes "name" "worker.lanes" "keda" $v.keda.enabled) }}
{{- $workers = append $workers (dict
  "name" (printf "%s-worker" $fullname)
  "pool" ""
  "component" "worker"
  "selector" (include "c2p-serve.selectorLabels" (dict "ctx" $ctx "component" "worker"))
  "profile" $profile
  "replicas" $w.replicas
  "resources" $p.resources
  "nodeSelector" $p.nodeSelector
  "tolerations" $p.tolerations
  "affinity" $w.affinity
  "extraEnv" $w.extraEnv
  "models" ""
  "memoryBudgetMB" ""
  "repository" false
  "lanes" $w.lanes
  "keda" $v.keda) }}
{{- end }}
{{- if not (kindIs "slice" $v.workerPools) }}
{{- fail "workerPools must be a list of pools ({name, models, lanes, ...}; docs/deploy.md, \"Several models\")" }}
{{- end }}
{{- $fields := list "name" "models" "lanes" "profile" "replicas" "resources" "nodeSelector" "tolerations" "affinity" "extraEnv" "memoryBudgetMB" "keda" }}
{{- $kedaFields := list "enabled" "minReplicaCount" "maxReplicaCount" "pollingInterval" "cooldownPeriod" "lagCount" "activationLagCount" "streamLength" "scaleDown" "fallbackFailureThreshold" "fallbackReplicas" }}
{{- $names := list }}
{{- range $i, $pool := $v.workerPools }}
{{- $where := printf "workerPools[%d]" $i }}
{{- if not (kindIs "map" $pool) }}
{{- fail (printf "%s must be a map ({name, models, lanes, ...}), not %v" $where $pool) }}
{{- end }}
{{- range $key, $_ := $pool }}
{{- if not (has $key $fields) }}
{{- fail (printf "%s.%s is not a pool setting (%s)" $where $key (join ", " $fields)) }}
{{- end }}
{{- end }}
{{- $name := toString ($pool.name | default "") }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "%s.name %q must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit (it names the Deployment %s-worker-<name>)" $where $name $fullname) }}
{{- end }}
{{- if has $name $names }}
{{- fail (printf "%s.name %q is used by another pool: pool names must be unique" $where $name) }}
{{- end }}
{{- $names = append $names $name }}
{{- $deployment := printf "%s-worker-%s" $fullname $name }}
{{- if gt (len $deployment) 63 }}
{{- fail (printf "%s.name %q: the Deployment name %s is longer than 63 characters; use a shorter pool name" $where $name $deployment) }}
{{- end }}
{{- $where = printf "workerPools[%d] (%s)" $i $name }}
{{- $models := toString ($pool.models | default "") | trim }}
{{- if not $models }}
{{- fail (printf "%s.models is empty: name the models this pool loads (C2P_WORKER__MODELS: NAME or NAME:VERSION from the model repository, comma-separated)" $where) }}
{{- end }}
{{- range splitList "," $models }}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$" (trim .)) }}
{{- fail (printf "%s.models: %q is not NAME or NAME:VERSION (letters, digits and _ . -, at most 64, not starting with . or -)" $where (trim .)) }}
{{- end }}
{{- end }}
{{- $k := deepCopy $v.keda }}
{{- range $key, $value := ($pool.keda | default dict) }}
{{- if not (has $key $kedaFields) }}
{{- fail (printf "%s.keda.%s cannot be set per pool (%s can; the rest are the release's)" $where $key (join ", " $kedaFields)) }}
{{- end }}
{{- if kindIs "map" $value }}
{{- $inner := deepCopy (get $k $key) }}
{{- range $key2, $value2 := $value }}
{{- $_ := set $inner $key2 $value2 }}
{{- end }}
{{- $_ := set $k $key $inner }}
{{- else }}
{{- $_ := set $k $key $value }}
{{- end }}
{{- end }}
{{- include "c2p-serve.checkLanes" (dict "lanes" ($pool.lanes | default list) "name" (printf "%s.lanes" $where) "keda" $k.enabled) }}
{{- $profile := include "c2p-serve.checkProfile" (dict "value" ($pool.profile | default $w.profile) "name" (printf "%s.profile" $where)) }}
{{- $p := index $w $profile }}
{{- $replicas := $w.replicas }}
{{- if hasKey $pool "replicas" }}
{{- $replicas = include "c2p-serve.wholeNumber" (dict "value" $pool.replicas "name" (printf "%s.replicas" $where) "min" 0) | int }}
{{- end }}
{{- $budget := "" }}
{{- if ne (toString ($pool.memoryBudgetMB | default "")) "" }}
{{- $budget = include "c2p-serve.wholeNumber" (dict "value" $pool.memoryBudgetMB "name" (printf "%s.memoryBudgetMB" $where) "min" 1) }}
{{- end }}
{{- $selector := printf "%s\nc2p-serve/pool: %s" (include "c2p-serve.selectorLabels" (dict "ctx" $ctx "component" "worker-pool")) $name }}
{{- $workers = append $workers (dict
  "name" $deployment
  "pool" $name
  "component" "worker-pool"
  "selector" $selector
  "profile" $profile
  "replicas" $replicas
  "resources" ($pool.resources | default $p.resources)
  "nodeSelector" (ternary $pool.nodeSelector $p.nodeSelector (hasKey $pool "nodeSelector"))
  "tolerations" (ternary $pool.tolerations $p.tolerations (hasKey $pool "tolerations"))
  "affinity" (ternary $pool.affinity $w.affinity (hasKey $pool "affinity"))
  "extraEnv" (concat ($w.extraEnv | default list) ($pool.extraEnv | default list))
  "models" $models
  "memoryBudgetMB" $budget
  "repository" true
  "lanes" ($pool.lanes | default list)
  "keda" $k) }}
{{- end }}
{{- if not $workers }}
{{- fail "worker.enabled is false and workerPools is empty: no worker would run a model" }}
{{- end }}
{{- if not (hasPrefix "/" (toString $v.modelRepository.mountPath)) }}
{{- fail (printf "modelRepository.mountPath must be an absolute path, not %q" (toString $v.modelRepository.mountPath)) }}
{{- end }}
{{- $_ := set .out "workers" $workers }}
{{- end }}

{{/* The worker Deployment of one entry of c2p-serve.workers: (dict "ctx" $ "w" WORKER). Every worker Deployment,
the default one and each pool's, is this one pod template. */}}
{{- define "c2p-serve.workerDeployment" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
{{- $w := $v.worker }}
{{- $d := .w }}
{{- $profile := $d.profile }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $d.name }}
  labels:
    {{- include "c2p-serve.labels" (dict "ctx" $ctx "component" $d.component) | nindent 4 }}
    {{- with $d.pool }}
    c2p-serve/pool: {{ . }}
    {{- end }}
    c2p-serve/profile: {{ $profile }}
spec:
  {{- if not $d.keda.enabled }}
  replicas: {{ $d.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- $d.selector | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      {{- toYaml $w.rollingUpdate | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "c2p-serve.labels" (dict "ctx" $ctx "component" $d.component) | nindent 8 }}
        {{- with $d.pool }}
        c2p-serve/pool: {{ . }}
        {{- end }}
        c2p-serve/profile: {{ $profile }}
        {{- with $w.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $w.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "c2p-serve.serviceAccountName" $ctx }}
      automountServiceAccountToken: false
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "c2p-serve.podSecurityContext" $ctx | nindent 8 }}
      # SIGTERM starts the drain (stop taking jobs, finish those in flight for C2P_WORKER__DRAIN_TIMEOUT_S, hand
      # back the rest); this is how long Kubernetes waits before SIGKILL (values.yaml explains the default).
      terminationGracePeriodSeconds: {{ include "c2p-serve.workerGracePeriod" $ctx }}
      containers:
        - name: worker
          image: {{ include "c2p-serve.image" (dict "ctx" $ctx "flavour" (ternary "cuda" "cpu" (eq $profile "gpu"))) | quote }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args: ["worker"]
          env:
            {{- include "c2p-serve.commonEnv" $ctx | nindent 12 }}
            - name: C2P_ENGINE__DEVICE
              value: {{ ternary "cuda" "cpu" (eq $profile "gpu") | quote }}
            - name: C2P_ENGINE__INTRA_OP_THREADS
              value: {{ (index $w $profile).intraOpThreads | quote }}
            - name: C2P_WORKER__OPS_PORT
              value: {{ $w.opsPort | quote }}
            # Where a model given by name or checkpoint is exported to (the root filesystem is read-only).
            - name: C2P_ARTIFACTS_DIR
              value: /tmp/c2p-artifacts
            {{- if $d.repository }}
            # The NAME/VERSION/ export folders (modelRepository) and the ones this pool loads from them.
            - name: C2P_MODEL_REPOSITORY
              value: {{ $v.modelRepository.mountPath | quote }}
            {{- end }}
            {{- with $d.models }}
            - name: C2P_WORKER__MODELS
              value: {{ . | quote }}
            {{- end }}
            {{- with $d.memoryBudgetMB }}
            - name: C2P_WORKER__MEMORY_BUDGET_MB
              value: {{ . | quote }}
            {{- end }}
            {{- with $v.dicomweb.destinationUrl }}
            - name: C2P_DICOMWEB__DESTINATION_URL
              value: {{ . | quote }}
            {{- end }}
            {{- with $v.dicomweb.headersSecret.name }}
            - name: C2P_DICOMWEB__DESTINATION_HEADERS
              valueFrom:
                secretKeyRef:
                  name: {{ . }}
                  key: {{ $v.dicomweb.headersSecret.key }}
            {{- end }}
            {{- with $d.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: metrics
              containerPort: {{ $w.opsPort }}
              protocol: TCP
          # The ops port opens once the engine is loaded and warm: the startup probe covers model load + warm-up.
          startupProbe:
            httpGet:
              path: /v2/health/live
              port: metrics
            periodSeconds: {{ $w.startupProbe.periodSeconds }}
            failureThreshold: {{ $w.startupProbe.failureThreshold }}
          # Restart only a worker whose event loop stopped answering (a long batch runs in a thread and does not
          # block it).
          livenessProbe:
            httpGet:
              path: /v2/health/live
              port: metrics
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 6
          # 503 while warming up, while Redis is unreachable and while draining (workers take no Service traffic;
          # readiness shows in rollouts and dashboards).
          readinessProbe:
            httpGet:
              path: /v2/health/ready
              port: metrics
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 2
          {{- if gt ($w.preStopSleepSeconds | int) 0 }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", "{{ $w.preStopSleepSeconds }}"]
          {{- end }}
          resources:
            {{- $resources := deepCopy ($d.resources | default dict) }}
            {{- if eq $profile "gpu" }}
            {{- $limits := merge (dict $w.gpu.resourceName ($w.gpu.count | int)) ($resources.limits | default dict) }}
            {{- $_ := set $resources "limits" $limits }}
            {{- $requests := merge (dict $w.gpu.resourceName ($w.gpu.count | int)) ($resources.requests | default dict) }}
            {{- $_ := set $resources "requests" $requests }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- include "c2p-serve.containerSecurityContext" (dict "uid" $v.runAsUser "gid" $v.runAsGroup) | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if and $d.repository $v.modelRepository.volume }}
            - name: model-repository
              mountPath: {{ $v.modelRepository.mountPath }}
              readOnly: true
            {{- end }}
      volumes:
        # The root filesystem is read-only; decoding scratch and exports go to /tmp.
        - name: tmp
          emptyDir: {}
        {{- if and $d.repository $v.modelRepository.volume }}
        - name: model-repository
          {{- toYaml $v.modelRepository.volume | nindent 10 }}
        {{- end }}
      {{- with $d.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $d.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $d.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* Whether any worker Deployment is scaled by KEDA (its operator then reads Redis): "true" or "". */}}
{{- define "c2p-serve.anyKeda" -}}
{{- $r := dict }}
{{- include "c2p-serve.workers" (dict "ctx" . "out" $r) }}
{{- range $r.workers }}
{{- if .keda.enabled }}true{{ end }}
{{- end }}
{{- end }}

{{/* The rules of a workers' NetworkPolicy (the default worker's and the pools'): Prometheus in on the ops port; out
only Redis, DNS and, when configured, the DICOMweb destination and the tracing collector. */}}
{{- define "c2p-serve.workerPolicyRules" -}}
{{- $np := .Values.networkPolicy -}}
policyTypes: ["Ingress", "Egress"]
ingress:
  - ports:
      - port: {{ .Values.worker.opsPort }}
        protocol: TCP
    from:
      - namespaceSelector:
          {{- toYaml $np.prometheus.namespaceSelector | nindent 10 }}
        podSelector:
          {{- toYaml $np.prometheus.podSelector | nindent 10 }}
egress:
  {{- if .Values.redis.enabled }}
  - to:
      - podSelector:
          matchLabels:
            {{- include "c2p-serve.selectorLabels" (dict "ctx" $ "component" "redis") | nindent 12 }}
    ports:
      - port: 6379
        protocol: TCP
  {{- else }}
  # The external Redis (any address on its port unless networkPolicy.externalRedisCidr narrows it).
  - ports:
      - port: {{ include "c2p-serve.urlPort" (.Values.redisUrl | default "redis://external") | int }}
        protocol: TCP
    {{- with $np.externalRedisCidr }}
    to:
      - ipBlock:
          cidr: {{ . }}
    {{- end }}
  {{- end }}
  - ports:
      - port: 53
        protocol: UDP
      - port: 53
        protocol: TCP
    to:
      - namespaceSelector:
          {{- toYaml $np.dns.namespaceSelector | nindent 10 }}
        podSelector:
          {{- toYaml $np.dns.podSelector | nindent 10 }}
  {{- with .Values.dicomweb.destinationUrl }}
  # The DICOMweb destination (any address on its port unless networkPolicy.worker.dicomwebCidr narrows it).
  - ports:
      - port: {{ $np.worker.dicomwebPort | default (include "c2p-serve.urlPort" .) | int }}
        protocol: TCP
    {{- with $np.worker.dicomwebCidr }}
    to:
      - ipBlock:
          cidr: {{ . }}
    {{- end }}
  {{- end }}
  {{- with .Values.tracing.endpoint }}
  # The OpenTelemetry collector.
  - ports:
      - port: {{ include "c2p-serve.urlPort" . | int }}
        protocol: TCP
  {{- end }}
  {{- with $np.worker.extraEgress }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
