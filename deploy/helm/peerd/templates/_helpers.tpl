{{- define "peerd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "peerd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "peerd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "peerd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "peerd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "peerd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "peerd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "peerd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "peerd.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The address containerd (on the same node) uses to reach peerd. */}}
{{/* Where containerd on the node reaches the HTTP face: its bind address,
or loopback when it binds every address. */}}
{{- define "peerd.localHost" -}}
{{- $b := toString .Values.http.bindAddress -}}
{{- if or (eq $b "0.0.0.0") (eq $b "::") (eq $b "") -}}127.0.0.1{{- else -}}{{ $b }}{{- end -}}
{{- end -}}

{{- define "peerd.mirrorURL" -}}
{{- printf "http://%s:%v" (include "peerd.localHost" .) .Values.http.port -}}
{{- end -}}

{{/* The probes' host: the bind address unless it is every address (then
kubelet's default, the pod IP, which is the node IP under hostNetwork). */}}
{{- define "peerd.probeHost" -}}
{{- $b := toString .Values.http.bindAddress -}}
{{- if not (or (eq $b "0.0.0.0") (eq $b "::") (eq $b "")) -}}{{ $b }}{{- end -}}
{{- end -}}

{{- define "peerd.registries" -}}
{{- required "registries: name at least one registry to mirror" (join "," .Values.registries) -}}
{{- end -}}

{{- define "peerd.dnsName" -}}
{{- printf "%s-p2p.%s.svc.%s" (include "peerd.fullname" .) .Release.Namespace .Values.bootstrap.clusterDomain -}}
{{- end -}}

{{/* Checks that keep a bad combination of values from rendering at all. */}}
{{- define "peerd.validate" -}}
{{- $mode := .Values.bootstrap.mode -}}
{{- if not (has $mode (list "static" "k8s-lease" "dns")) -}}
{{- fail (printf "bootstrap.mode %q: want static, k8s-lease or dns" $mode) -}}
{{- end -}}
{{- if and (eq $mode "static") (empty .Values.bootstrap.static) -}}
{{- fail "bootstrap.mode static needs bootstrap.static (multiaddrs ending in /p2p/<peer id>)" -}}
{{- end -}}
{{- if and (eq $mode "k8s-lease") (not .Values.rbac.create) (not .Values.serviceAccount.name) -}}
{{- fail "bootstrap.mode k8s-lease needs rbac.create, or serviceAccount.name bound to equivalent rights" -}}
{{- end -}}
{{- $mon := or .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled -}}
{{- if not (has (toString .Values.http.bindAddress) (list "127.0.0.1" "0.0.0.0")) -}}
{{- fail "http.bindAddress: want 127.0.0.1 or 0.0.0.0 (containerd reaches peerd on 127.0.0.1)" -}}
{{- end -}}
{{- if and $mon (eq (toString .Values.http.bindAddress) "127.0.0.1") -}}
{{- fail "monitoring needs http.bindAddress reachable by Prometheus (e.g. 0.0.0.0); on loopback only the node itself can scrape" -}}
{{- end -}}
{{- end -}}

{{/* "true" when the nodes run CRI-O (registries.conf) rather than containerd. */}}
{{- define "peerd.crio" -}}
{{- if eq .Values.runtime "crio" }}true{{ end -}}
{{- end }}

{{/* "true" when the chart writes the runtime's mirror configuration. */}}
{{- define "peerd.configureMirror" -}}
{{- if include "peerd.crio" . }}{{ if .Values.crio.configureMirror }}true{{ end }}{{ else if .Values.containerd.configureMirror }}true{{ end -}}
{{- end }}
