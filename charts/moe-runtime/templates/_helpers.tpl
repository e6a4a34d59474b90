{{/*
Ports fixed by docs/contracts.md. They are not values: every service, the launcher and
docker-compose agree on them, and a NetworkPolicy is only as right as the port it names.
*/}}
{{- define "moe-runtime.port.gateway" -}}50050{{- end }}
{{- define "moe-runtime.port.router" -}}50051{{- end }}
{{- define "moe-runtime.port.attention" -}}50052{{- end }}
{{- define "moe-runtime.port.expert" -}}50053{{- end }}
{{- define "moe-runtime.port.ucx" -}}50054{{- end }}
{{- define "moe-runtime.port.metrics" -}}9400{{- end }}
{{- define "moe-runtime.port.redis" -}}6379{{- end }}

{{/* name: the chart's name, overridable, so labels say what app a pod belongs to. */}}
{{- define "moe-runtime.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* fullname: prefix of every resource name, unique per release so two releases share a namespace. */}}
{{- define "moe-runtime.fullname" -}}
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

{{/* chart: name-version for the helm.sh/chart label, so an object tells which chart made it. */}}
{{- define "moe-runtime.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
selectorLabels: the ONLY labels in selectors (name, instance, component). Selectors are immutable,
so nothing that changes between upgrades (version, chart) may appear here.
Call with (dict "ctx" $ "component" "router").
*/}}
{{- define "moe-runtime.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-runtime.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* labels: selector labels plus the ones that may change on upgrade, for every object. */}}
{{- define "moe-runtime.labels" -}}
helm.sh/chart: {{ include "moe-runtime.chart" .ctx }}
{{ include "moe-runtime.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/* serviceAccountName: the autoscaler's account, the only pod that talks to the Kubernetes API. */}}
{{- define "moe-runtime.serviceAccountName" -}}
{{- printf "%s-autoscaler" (include "moe-runtime.fullname" .) }}
{{- end }}

{{/* releasePodLabels: matches every pod of this release (NetworkPolicy peers for Redis). */}}
{{- define "moe-runtime.releasePodLabels" -}}
app.kubernetes.io/name: {{ include "moe-runtime.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
rolePodLabels: all pods of one role across their Deployments (every attention plane, every expert
shard), for NetworkPolicies. Pod-template label only, never a selector.
Call with (dict "ctx" $ "role" "expert").
*/}}
{{- define "moe-runtime.rolePodLabels" -}}
{{ include "moe-runtime.releasePodLabels" .ctx }}
moe-runtime.io/role: {{ .role }}
{{- end }}

{{/* image: one image for every service, the tag defaulting to the chart's appVersion. */}}
{{- define "moe-runtime.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* expertDeploymentName: shard Deployments are named here so the autoscaler's Role can name them. */}}
{{- define "moe-runtime.expertDeploymentName" -}}
{{- printf "%s-expert-%s" (include "moe-runtime.fullname" .ctx) .shard.name }}
{{- end }}

{{/*
planeIndex: the plane a pod sits on. An explicit index wins; otherwise item i of a list goes to
plane i mod len(planes), so shards spread over planes by default.
Call with (dict "ctx" $ "plane" .plane "index" $i "what" "expertShards[0]").
*/}}
{{- define "moe-runtime.planeIndex" -}}
{{- $count := len .ctx.Values.planes }}
{{- $plane := ternary (mod .index $count) .plane (kindIs "invalid" .plane) | int }}
{{- if ge $plane $count }}
{{- fail (printf "%s.plane is %d but only %d plane(s) are defined (planes is indexed from 0)" .what $plane $count) }}
{{- end }}
{{- $plane }}
{{- end }}

{{/* planeAnnotations: the Multus attachment that gives a pod its plane's (RDMA) interface. */}}
{{- define "moe-runtime.planeAnnotations" -}}
{{- $plane := index .ctx.Values.planes .plane }}
{{- if $plane.network }}
k8s.v1.cni.cncf.io/networks: {{ $plane.network | quote }}
{{- end }}
{{- end }}

{{/* planePlacement: a plane's node selector, node affinity and tolerations (pod spec fields). */}}
{{- define "moe-runtime.planePlacement" -}}
{{- $plane := index .ctx.Values.planes .plane }}
{{- with $plane.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $plane.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $plane.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* planeEnv: MOE_PLANE and the RDMA devices UCX may use on that plane. */}}
{{- define "moe-runtime.planeEnv" -}}
{{- $plane := index .ctx.Values.planes .plane -}}
- name: MOE_PLANE
  value: {{ .plane | quote }}
{{- with $plane.ucxNetDevices }}
- name: UCX_NET_DEVICES
  value: {{ . | quote }}
{{- end }}
{{- if and (eq .ctx.Values.transport "ucx") (eq .ctx.Values.device "cuda") }}
{{- /* A polling progress loop matched NCCL over NVLink (0.99x at 64 MiB) where the default
       progress thread reached 0.63x; GPU nodes have the cores to spare. */}}
- name: UCXPY_PROGRESS_MODE
  value: polling
{{- end }}
{{- end }}

{{/* placement: node selector and tolerations for pods on no plane (router, gateway, autoscaler, Redis). */}}
{{- define "moe-runtime.placement" -}}
{{- with .Values.placement.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.placement.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* redisUrl: the bundled Redis Service, or the external URL. */}}
{{- define "moe-runtime.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis:%s/0" (include "moe-runtime.fullname" .) (include "moe-runtime.port.redis" .) }}
{{- else }}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl }}
{{- end }}
{{- end }}

{{/* redisSecretName: the Secret holding the Redis password; empty when external Redis has none. */}}
{{- define "moe-runtime.redisSecretName" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else if .Values.redis.enabled }}
{{- printf "%s-redis" (include "moe-runtime.fullname" .) }}
{{- end }}
{{- end }}

{{/* commonEnv: what every service reads (docs/contracts.md). */}}
{{- define "moe-runtime.commonEnv" -}}
- name: MOE_CLUSTER
  value: {{ .Values.cluster | quote }}
- name: MOE_REDIS_URL
  value: {{ include "moe-runtime.redisUrl" . | quote }}
{{- with include "moe-runtime.redisSecretName" . }}
- name: MOE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.auth.passwordKey }}
{{- end }}
- name: MOE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: MOE_METRICS_PORT
  value: {{ include "moe-runtime.port.metrics" . | quote }}
# Peers dial the pod IP registered in Redis; the pod's name is not resolvable without a headless Service.
- name: MOE_ADVERTISE_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/* modelEnv: where router, attention and experts find the checkpoint. */}}
{{- define "moe-runtime.modelEnv" -}}
- name: MOE_MODEL_DIR
  value: {{ .Values.model.mountPath | quote }}
{{- end }}

{{/* modelVolume: the checkpoint, read-only at the source as well as at the mount. */}}
{{- define "moe-runtime.modelVolume" -}}
- name: model
{{- if and .Values.model.persistentVolumeClaim .Values.model.hostPath }}
{{- fail "set only one of model.persistentVolumeClaim and model.hostPath" }}
{{- else if .Values.model.persistentVolumeClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.persistentVolumeClaim }}
    readOnly: true
{{- else if .Values.model.hostPath }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- else }}
{{- fail "set model.persistentVolumeClaim or model.hostPath: the checkpoint is not baked into the image" }}
{{- end }}
{{- end }}

{{/* podSecurityContext: the image's numeric non-root user, so runAsNonRoot can be verified. */}}
{{- define "moe-runtime.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* containerSecurityContext: nothing to escalate to, nothing writable but the /tmp emptyDir. */}}
{{- define "moe-runtime.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end }}

{{/*
grpcProbes: native gRPC health probes (grpc.health.v1, service "") on the service port. The
startup probe gives weight loading its own budget, so liveness can stay strict afterwards.
Call with (dict "ctx" $ "port" 50051).
*/}}
{{- define "moe-runtime.grpcProbes" -}}
{{- $period := .ctx.Values.probes.periodSeconds | int -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ $period }}
  failureThreshold: {{ div (add (int .ctx.Values.probes.startupTimeoutSeconds) $period -1) $period }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ $period }}
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: {{ $period }}
  failureThreshold: 6
{{- end }}

{{/* tmpVolume: HOME and caches live in /tmp (see Dockerfile), the only writable path. */}}
{{- define "moe-runtime.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{/*
metricsIngress: one NetworkPolicy ingress rule for the /metrics port, only when peers are named
(an empty `from` would mean everyone). Call with (dict "from" peers "port" 9400).
*/}}
{{- define "moe-runtime.metricsIngress" -}}
{{- with .from }}
- from:
    {{- toYaml . | nindent 4 }}
  ports:
    - port: {{ $.port }}
      protocol: TCP
{{- end }}
{{- end }}

{{/*
Autoscaler targets (MOE_AUTOSCALER_TARGETS): one entry per expert shard, the JSON format
services/autoscaler reads, so the decider scales exactly the Deployments this chart made.
*/}}
{{- define "moe-runtime.autoscalerTargets" -}}
{{- $targets := list }}
{{- range .Values.expertShards }}
{{- $deployment := include "moe-runtime.expertDeploymentName" (dict "ctx" $ "shard" .) }}
{{- $targets = append $targets (dict "shard" .name "experts" (toString .experts) "deployment" $deployment "minReplicas" (.minReplicas | int) "maxReplicas" (.maxReplicas | int)) }}
{{- end }}
{{- toJson $targets }}
{{- end }}

{{/* podBasics: the pod-spec fields every service shares (grace, non-root user, pull secrets). */}}
{{- define "moe-runtime.podBasics" -}}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds | int }}
securityContext:
  {{- include "moe-runtime.podSecurityContext" . | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* containerImage: one image and pull policy for every container, set in one place. */}}
{{- define "moe-runtime.containerImage" -}}
image: {{ include "moe-runtime.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- end }}

{{/*
volumeMounts: the checkpoint, read-only, for services that load weights, and the writable /tmp
every container needs. Call with (dict "ctx" $ "model" true).
*/}}
{{- define "moe-runtime.volumeMounts" -}}
{{- if .model -}}
- name: model
  mountPath: {{ .ctx.Values.model.mountPath }}
  readOnly: true
{{ end -}}
- name: tmp
  mountPath: /tmp
{{- end }}
