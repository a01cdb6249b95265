{{/*
Names, labels, validation and the ONE pod template shared by every workload of the chart
(trainer, TensorBoard, evaluator, eval-Job launcher, eval Job).
*/}}

{{/* Chart name, cut to a DNS label. */}}
{{- define "repa.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource-name prefix: `<release>-<name>` (or the release name if it contains the chart name), <= 63 chars. */}}
{{- define "repa.fullname" -}}
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
`<fullname>-<suffix>` with the prefix cut so the whole name is a DNS label (<= 63 chars).
Usage: include "repa.componentName" (list $ "tensorboard")
*/}}
{{- define "repa.componentName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $prefix := include "repa.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $suffix }}
{{- end }}

{{/*
PyTorchJob name. The operator names one Service per pod `<job>-worker-<index>` (a DNS-1035 label,
<= 63 chars), so the job name is cut to 50 characters: room for "-worker-" and a 3-digit index.
*/}}
{{- define "repa.jobName" -}}
{{- include "repa.fullname" . | trunc 50 | trimSuffix "-" }}
{{- end }}

{{/*
Name prefix of the eval Jobs (metadata.generateName, ends in "-"). `repa watch --launch-jobs` names
each Job `<prefix>-step-<7 digits>-<6-hex protocol digest>` and shortens the prefix to fit 63 chars.
*/}}
{{- define "repa.evalJobPrefix" -}}
{{- printf "%s-eval-" (include "repa.fullname" . | trunc 50 | trimSuffix "-") }}
{{- end }}

{{- define "repa.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "repa.labels" -}}
helm.sh/chart: {{ include "repa.chart" . }}
{{ include "repa.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: repa
{{- end }}

{{- define "repa.selectorLabels" -}}
app.kubernetes.io/name: {{ include "repa.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: include "repa.componentLabels" (list $ "trainer") */}}
{{- define "repa.componentLabels" -}}
{{ include "repa.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "repa.componentSelectorLabels" -}}
{{ include "repa.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* ServiceAccount of the trainer, TensorBoard, evaluator and eval-Job pods (storage identity). */}}
{{- define "repa.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "repa.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the eval-Job launcher: the only one allowed to call the Kubernetes API. */}}
{{- define "repa.launcherServiceAccountName" -}}
{{- include "repa.componentName" (list . "eval-launcher") }}
{{- end }}

{{/*
The values a release cannot do without, all named in one message with what to set (helm lint --strict on
the bare chart says exactly this). No defaults: a placeholder image or bucket would render fine and fail
later in the cluster (ImagePullBackOff, a trainer that cannot write).
*/}}
{{- define "repa.requireValues" -}}
{{- $missing := list }}
{{- if not .Values.image.repository }}
{{- $missing = append $missing (printf "image.repository (the repa image in your registry: `make image` builds localhost/repa:%s; push it and set e.g. image.repository=ghcr.io/<you>/repa)" .Chart.AppVersion) }}
{{- end }}
{{- if not (dig "data" "url" "" .Values.config) }}
{{- $missing = append $missing "config.data.url (the dataset `repa prepare` wrote, e.g. s3://bucket/imagenet-256)" }}
{{- end }}
{{- if not (dig "storage" "run_url" "" .Values.config) }}
{{- $missing = append $missing "config.storage.run_url (where the run writes checkpoints, e.g. s3://bucket/runs/myrun)" }}
{{- end }}
{{- if $missing }}
{{- fail (printf "required values not set: %s" (join "; " $missing)) }}
{{- end }}
{{- end }}

{{/* image reference: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "repa.image" -}}
{{- include "repa.requireValues" . }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/* Where the run config is mounted; the CLI contract of the image (`--config /etc/repa/config.yaml`). */}}
{{- define "repa.configPath" -}}/etc/repa/config.yaml{{- end }}
{{- define "repa.evalJobTemplatePath" -}}/etc/repa/eval-job.yaml{{- end }}

{{/* `<config.storage.run_url>/tensorboard`, the trainer's event-file location. */}}
{{- define "repa.tensorboardLogdir" -}}
{{- printf "%s/tensorboard" (trimSuffix "/" .Values.config.storage.run_url) }}
{{- end }}

{{/* sha256 of the rendered run config: a config change rolls the Deployments. */}}
{{- define "repa.configChecksum" -}}
{{- toYaml .Values.config | sha256sum }}
{{- end }}

{{/*
Cross-field rules that values.schema.json cannot express. Each message names the field and the fix.
*/}}
{{- define "repa.validate" -}}
{{- include "repa.requireValues" . }}
{{- $t := .Values.trainer }}
{{- $min := int64 $t.minReplicas }}
{{- $max := int64 $t.maxReplicas }}
{{- if gt $min $max }}
{{- fail (printf "trainer.minReplicas (%d) must be <= trainer.maxReplicas (%d)" $min $max) }}
{{- end }}
{{- if not (kindIs "invalid" $t.replicas) }}
{{- $r := int64 $t.replicas }}
{{- if or (lt $r $min) (gt $r $max) }}
{{- fail (printf "trainer.replicas (%d) must lie in [trainer.minReplicas, trainer.maxReplicas] = [%d, %d]" $r $min $max) }}
{{- end }}
{{- end }}
{{- $nproc := toString $t.nprocPerNode }}
{{- $gpus := int64 $t.gpus }}
{{- if and (regexMatch "^[0-9]+$" $nproc) (gt $gpus 0) (gt (int64 $nproc) $gpus) }}
{{- fail (printf "trainer.nprocPerNode (%s) must be <= trainer.gpus (%d): one process per GPU" $nproc $gpus) }}
{{- end }}
{{- if and (eq $nproc "gpu") (eq $gpus 0) }}
{{- fail "trainer.nprocPerNode is \"gpu\" but trainer.gpus is 0: give the pods GPUs or set a process count" }}
{{- end }}
{{- $gbs := dig "train" "global_batch_size" 0 .Values.config }}
{{- if and $gbs (regexMatch "^[0-9]+$" $nproc) }}
{{- range $n := untilStep (int $min) (int (add $max 1)) 1 }}
{{- $world := mul $n (int64 $nproc) }}
{{- if ne (mod (int64 $gbs) $world) 0 }}
{{- fail (printf "config.train.global_batch_size (%d) is not divisible by the world size %d = %d workers x trainer.nprocPerNode %s; an elastic job may run with any worker count in trainer.minReplicas..maxReplicas = %d..%d, and each must divide the global batch" (int64 $gbs) $world $n $nproc $min $max) }}
{{- end }}
{{- end }}
{{- end }}
{{- $job := include "repa.jobName" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $job) }}
{{- fail (printf "%s name %q (from the release name / fullnameOverride) must be a DNS-1035 label: start with a letter, then lowercase letters, digits and '-'" (include "repa.trainerKind" .) $job) }}
{{- end }}
{{- if eq $t.backend "trainjob" }}
{{- include "repa.validateTrainJob" . }}
{{- end }}
{{- if and .Values.storageAuth.mountPath (not .Values.storageAuth.existingSecret) }}
{{- fail "storageAuth.mountPath is set but storageAuth.existingSecret is empty: name the Secret to mount" }}
{{- end }}
{{- if .Values.evaluator.enabled }}
{{- $refstats := dig "eval" "reference_stats_url" "" .Values.config }}
{{- /* Also with config.preset: no preset carries reference statistics (they are the user's files), so a
       preset install without them would only start an evaluator that crash-loops. */}}
{{- if not $refstats }}
{{- $preset := ternary (printf " (config.preset %s carries none)" (toString .Values.config.preset)) "" (not (empty .Values.config.preset)) }}
{{- fail (printf "evaluator.enabled is true but config.eval.reference_stats_url is empty%s: `repa eval` needs reference statistics; set config.eval.reference_stats_url, or set evaluator.enabled=false" $preset) }}
{{- end }}
{{- end }}
{{- if and .Values.gangScheduling.queue (not .Values.gangScheduling.enabled) }}
{{- fail "gangScheduling.queue is set but gangScheduling.enabled is false: enable gang scheduling or clear the queue" }}
{{- end }}
{{- end }}

{{/* Kind of the training object: TrainJob (Trainer v2) or PyTorchJob (Training Operator v1.9). */}}
{{- define "repa.trainerKind" -}}
{{- ternary "TrainJob" "PyTorchJob" (eq .Values.trainer.backend "trainjob") }}
{{- end }}

{{/*
Rules of backend `trainjob` (Kubeflow Trainer v2.3.0): a fixed node count (the ElasticPolicy API was
removed in v2.2.0), numProcPerNode is "auto" or an integer, PET_* belong to the torch plugin, and what
runtimePatches cannot carry (envFrom, priorityClassName, schedulerName, imagePullPolicy, podGroupPolicy)
needs the release's own TrainingRuntime. docs/kubernetes.md "Two backends".
*/}}
{{- define "repa.validateTrainJob" -}}
{{- $t := .Values.trainer }}
{{- $own := $t.trainJob.createRuntime }}
{{- if ne (int64 $t.minReplicas) (int64 $t.maxReplicas) }}
{{- fail (printf "trainer.backend is trainjob but trainer.minReplicas (%d) != trainer.maxReplicas (%d): a TrainJob has a fixed node count (Trainer v2 has no elastic training); set them equal, or set trainer.backend=pytorchjob for an elastic min:max run" (int64 $t.minReplicas) (int64 $t.maxReplicas)) }}
{{- end }}
{{- if and (not (kindIs "invalid" $t.replicas)) (ne (int64 $t.replicas) (int64 $t.maxReplicas)) }}
{{- fail (printf "trainer.backend is trainjob but trainer.replicas (%d) != trainer.maxReplicas (%d): a TrainJob runs a fixed node count; set trainer.replicas=null, or set trainer.backend=pytorchjob" (int64 $t.replicas) (int64 $t.maxReplicas)) }}
{{- end }}
{{- if not (regexMatch "^([0-9]+|auto)$" (toString $t.nprocPerNode)) }}
{{- fail (printf "trainer.nprocPerNode (%s): a TrainJob's numProcPerNode is a count or \"auto\"; set a count, or set trainer.backend=pytorchjob" (toString $t.nprocPerNode)) }}
{{- end }}
{{- range $e := concat $.Values.pod.env $t.env }}
{{- if has $e.name (list "PET_NNODES" "PET_NPROC_PER_NODE" "PET_NODE_RANK" "PET_MASTER_ADDR" "PET_MASTER_PORT") }}
{{- fail (printf "%s is set in pod.env or trainer.env, but the Trainer torch plugin injects it and rejects a TrainJob that sets it: remove it" $e.name) }}
{{- end }}
{{- end }}
{{- if not $own }}
{{- $why := "TrainJob runtimePatches cannot set it; set trainer.trainJob.createRuntime=true (the release's own TrainingRuntime)" }}
{{- if .Values.storageAuth.existingSecret }}
{{- fail (printf "storageAuth.existingSecret needs envFrom, but %s, or use workload identity (serviceAccount.annotations)" $why) }}
{{- end }}
{{- if $t.priorityClassName }}
{{- fail (printf "trainer.priorityClassName is set, but %s" $why) }}
{{- end }}
{{- if .Values.gangScheduling.enabled }}
{{- fail "gangScheduling.enabled: a TrainJob is gang-scheduled by its runtime's podGroupPolicy, which runtimePatches cannot set; set trainer.trainJob.createRuntime=true (the release's own TrainingRuntime), or reference a runtime with a podGroupPolicy (trainer.trainJob.runtimeName) and keep gangScheduling.enabled=false" }}
{{- end }}
{{- if ne .Values.image.pullPolicy "IfNotPresent" }}
{{- fail (printf "image.pullPolicy is %s, but %s" .Values.image.pullPolicy $why) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The trainer's pod template, for both backends: torchrun runs `repa train`; the Kubeflow controller
injects the PET_* variables torchrun reads as its flag defaults. The container is `pytorch` (the v1
operator requires it) or `node` (the container the v2 torch plugin injects into).
*/}}
{{- define "repa.trainerPod" -}}
{{- $t := .Values.trainer }}
{{- $gang := .Values.gangScheduling }}
{{- /* torchrun's c10d rendezvous shares its TCPStore with the workers across restart rounds, so a
       restarted group can read the previous round's process-group keys (stale peer addresses)
       and hang in init_process_group; a fresh store per round avoids it (tests/integration/test_train.py). */}}
{{- $env := list (dict "name" "TORCH_NCCL_ASYNC_ERROR_HANDLING" "value" (ternary "1" "0" $t.nccl.asyncErrorHandling)) (dict "name" "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" "value" "1") }}
{{- /* torchrun SIGKILLs its workers this long after forwarding SIGTERM (torch's default 30 s would cut a
       large preemption checkpoint short, whatever the grace period; docs/kubernetes.md "Preemption").
       `repa torchrun` is torchrun that then exits 143 instead of 1 (repa/cluster/launch.py). */}}
{{- $env = append $env (dict "name" "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" "value" (toString (max 1 (sub (int $t.terminationGracePeriodSeconds) (int $t.shutdownMarginSeconds))))) }}
{{- /* The run lease's job identity (repa/lease.py, docs/kubernetes.md "Preemption and restarts"): a pod
       of the same job takes the lease over, any other writer is refused with exit 5. TrainJob: the
       JobSet the Trainer makes of it (named after the TrainJob) labels every pod with its name and uid,
       so a JobSet restart (failurePolicy) is the same job and a new TrainJob, even of the same release,
       is not; torchrun's own run id there is "none" for every TrainJob. PyTorchJob: the job's
       namespace/name (its pods carry no uid label; the operator's rendezvous id is the job name too). */}}
{{- if eq $t.backend "trainjob" }}
{{- $env = append $env (dict "name" "REPA_JOBSET_NAME" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.labels['jobset.sigs.k8s.io/jobset-name']"))) }}
{{- $env = append $env (dict "name" "REPA_JOBSET_UID" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.labels['jobset.sigs.k8s.io/jobset-uid']"))) }}
{{- $env = append $env (dict "name" "REPA_JOB_ID" "value" (printf "trainjob/%s/$(REPA_JOBSET_NAME)/$(REPA_JOBSET_UID)" .Release.Namespace)) }}
{{- else }}
{{- $env = append $env (dict "name" "REPA_JOB_ID" "value" (printf "pytorchjob/%s/%s" .Release.Namespace (include "repa.jobName" .))) }}
{{- end }}
{{- with $t.nccl.debug }}
{{- $env = append $env (dict "name" "NCCL_DEBUG" "value" .) }}
{{- end }}
{{- with $t.nccl.socketIfname }}
{{- $env = append $env (dict "name" "NCCL_SOCKET_IFNAME" "value" .) }}
{{- end }}
{{- include "repa.podTemplate" (dict
      "root" .
      "component" "trainer"
      "container" (ternary "node" "pytorch" (eq $t.backend "trainjob"))
      "command" (list "repa" "torchrun")
      "args" (list "-m" "repa" "train" "--config" (include "repa.configPath" .))
      "env" $env
      "w" $t
      "schedulerName" (ternary $gang.schedulerName "" $gang.enabled)
      "terminationGracePeriodSeconds" $t.terminationGracePeriodSeconds) }}
{{- end }}

{{/*
THE pod template (metadata + spec) of every workload. Arguments (a dict):
  root          the chart root context ($)
  component     app.kubernetes.io/component value (trainer, tensorboard, evaluator, eval-launcher, eval)
  container     container name (`pytorch` for the PyTorchJob: the operator requires it)
  command, args container command and args (lists)
  w             the workload's values: gpus, resources, shmSizeLimit, nodeSelector, tolerations, affinity,
                priorityClassName, env (all optional)
  env           extra EnvVar list set by the template (NCCL, checkpoint URL, ...)
  ports         container ports (list), optional
  probes        dict with readinessProbe / livenessProbe / startupProbe, optional
  restartPolicy pod restartPolicy, optional (the operator sets it for PyTorchJob pods)
  terminationGracePeriodSeconds  optional
  schedulerName optional
  serviceAccountName  default: repa.serviceAccountName
  automountToken      default false: only the eval-Job launcher talks to the Kubernetes API
  evalJobTemplate     mount ConfigMap `<fullname>-eval-job` at /etc/repa/eval-job.yaml too
  configChecksum      add the config checksum annotation (Deployments)
*/}}
{{- define "repa.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $w := default dict .w }}
{{- $gpus := int64 (default 0 $w.gpus) }}
{{- $resources := deepCopy (default dict $w.resources) }}
{{- if gt $gpus 0 }}
{{- $limits := default dict (get $resources "limits") }}
{{- $_ := set $limits "nvidia.com/gpu" $gpus }}
{{- $_ := set $resources "limits" $limits }}
{{- end -}}
metadata:
  labels:
    {{- include "repa.componentSelectorLabels" (list $root .component) | nindent 4 }}
    app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
    app.kubernetes.io/part-of: repa
    {{- with $v.pod.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if or $v.pod.annotations .configChecksum }}
  annotations:
    {{- if .configChecksum }}
    checksum/config: {{ include "repa.configChecksum" $root }}
    {{- end }}
    {{- with $v.pod.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
spec:
  serviceAccountName: {{ default (include "repa.serviceAccountName" $root) .serviceAccountName }}
  automountServiceAccountToken: {{ default false .automountToken }}
  {{- with .restartPolicy }}
  restartPolicy: {{ . }}
  {{- end }}
  {{- with .schedulerName }}
  schedulerName: {{ . }}
  {{- end }}
  {{- if not (kindIs "invalid" .terminationGracePeriodSeconds) }}
  terminationGracePeriodSeconds: {{ int64 .terminationGracePeriodSeconds }}
  {{- end }}
  {{- with $w.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.pod.securityContext | nindent 4 }}
  {{- with $w.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "repa.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command:
        {{- toYaml .command | nindent 8 }}
      {{- with .args }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .probes }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
      {{- with $v.storageAuth.existingSecret }}
      envFrom:
        - secretRef:
            name: {{ . }}
      {{- end }}
      env:
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        {{- range $name, $value := $v.storageAuth.env }}
        - name: {{ $name }}
          value: {{ $value | toString | quote }}
        {{- end }}
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.pod.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $w.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.pod.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/repa
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: cache
          mountPath: /home/repa/.cache
        {{- if $w.shmSizeLimit }}
        - name: dshm
          mountPath: /dev/shm
        {{- end }}
        {{- if $v.storageAuth.mountPath }}
        - name: storage-credentials
          mountPath: {{ $v.storageAuth.mountPath }}
          readOnly: true
        {{- end }}
        {{- with $v.pod.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      projected:
        sources:
          - configMap:
              name: {{ include "repa.componentName" (list $root "config") }}
              items:
                - key: config.yaml
                  path: config.yaml
          {{- if .evalJobTemplate }}
          - configMap:
              name: {{ include "repa.componentName" (list $root "eval-job") }}
              items:
                - key: eval-job.yaml
                  path: eval-job.yaml
          {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $v.pod.tmpSizeLimit }}
    - name: cache
      emptyDir:
        sizeLimit: {{ $v.pod.cacheSizeLimit }}
    {{- with $w.shmSizeLimit }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ . }}
    {{- end }}
    {{- if $v.storageAuth.mountPath }}
    - name: storage-credentials
      secret:
        secretName: {{ $v.storageAuth.existingSecret }}
    {{- end }}
    {{- with $v.pod.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The eval Job for one checkpoint (REPA_CHECKPOINT_URL is filled in by `repa watch --launch-jobs` or by hand). */}}
{{- define "repa.evalJob" -}}
{{- $v := .Values }}
{{- $j := $v.evaluator.job -}}
apiVersion: batch/v1
kind: Job
metadata:
  generateName: {{ include "repa.evalJobPrefix" . }}
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "repa.componentLabels" (list . "eval") | nindent 4 }}
    {{- with $v.kueue.queueName }}
    kueue.x-k8s.io/queue-name: {{ . }}
    {{- end }}
spec:
  {{- if $v.kueue.queueName }}
  suspend: true
  {{- end }}
  backoffLimit: {{ int64 $j.backoffLimit }}
  ttlSecondsAfterFinished: {{ int64 $j.ttlSecondsAfterFinished }}
  {{- if not (kindIs "invalid" $j.activeDeadlineSeconds) }}
  activeDeadlineSeconds: {{ int64 $j.activeDeadlineSeconds }}
  {{- end }}
  template:
    {{- include "repa.podTemplate" (dict
          "root" .
          "component" "eval"
          "container" "eval"
          "command" (list "repa")
          "args" (list "eval" "--config" (include "repa.configPath" .) "--checkpoint" "$(REPA_CHECKPOINT_URL)")
          "env" (list (dict "name" "REPA_CHECKPOINT_URL" "value" ""))
          "w" $j
          "restartPolicy" "OnFailure"
          "terminationGracePeriodSeconds" 120) | nindent 4 }}
{{- end }}
