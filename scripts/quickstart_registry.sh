#!/usr/bin/env bash
# Writes a registry file (CSV, docs/registry.md) for the quickstart's simulated fleet: one
# elder per bracelet, with a Chinese name, an address in Hangzhou, a grid (one per ten
# elders) with its grid worker and backup, a guardian, and the community and township
# supervisors.
#
#   bracelet-sim ids --devices 50 --id-prefix qs- --scenario ... --with-scenario \
#     | scripts/quickstart_registry.sh > .run/quickstart-registry.csv
#   scripts/quickstart_registry.sh --regions 50 > .run/quickstart-regions.csv
#
# --regions N writes the region tree for N elders instead: 杭州市 > 西湖区 > one community per
# street > one grid per ten elders (codes qs-hz, qs-xh, qs-c<k>, qs-g<n>).
#
# Input: "<device id><TAB><scenario>" per line (the scenario goes into the elder's notes).
# Output is deterministic, so importing it again changes nothing. Every phone number starts
# with 199 and every mail address ends in example.com: made up, and kept apart from the
# numbers in examples/registry/.
set -euo pipefail

surnames=(王 李 张 刘 陈 杨 黄 赵 吴 周 徐 孙 马 朱 胡 郭 何 高 林 罗 郑 梁 谢 宋 唐 许 韩 冯 邓 曹)
elder_given=(桂英 秀兰 玉珍 建国 德明 阿土 美华 淑芬 志强 兰芳 福生 金花 根宝 凤英 水林 阿宝 招娣 长根 月娥 国平 惠芳 炳坤 雪梅 荣华 彩凤 永康 素琴 茂林 巧云 连生 阿香)
young_given=(伟 敏 静 磊 洋 婷 军 芳 强 丽 杰 娟 涛 燕 斌 霞 浩 琳 鹏 颖)
grid_workers=(王芳 陈静 李娜 张伟 刘洋 杨帆 黄蕾 周婷 吴迪 徐峰)
backups=(赵磊 孙悦 马骏 朱琳 胡斌 郭婷 何欢 高翔 林溪 罗杰)
streets=(文三路 学院路 保俶路 曙光路 教工路 天目山路)
categories=("独居" "空巢" "独居;特困" "留守" "空巢" "独居")

if [ "${1:-}" = "--regions" ]; then
  n=${2:?--regions needs the number of elders}
  grids=$(( (n + 9) / 10 ))
  echo "code,name,level,parent_code"
  echo "qs-hz,杭州市,city,"
  echo "qs-xh,西湖区,township,qs-hz"
  for (( k = 0; k < ${#streets[@]} && k < grids; k++ )); do
    echo "qs-c$k,${streets[$k]}社区,community,qs-xh"
  done
  for (( g = 0; g < grids; g++ )); do
    echo "qs-g$g,${streets[$(( g % ${#streets[@]} ))]}社区第$(( g + 1 ))网格,grid,qs-c$(( g % ${#streets[@]} ))"
  done
  exit 0
fi

echo "ref,name,birth_date,phone,address,community,region,categories,wander_risk,language,devices,notes,grid_worker_name,grid_worker_phone,grid_worker_email,backup_grid_worker_name,backup_grid_worker_phone,backup_grid_worker_email,guardian1_name,guardian1_phone,guardian1_email,community_supervisor_name,community_supervisor_phone,community_supervisor_email,township_supervisor_name,township_supervisor_phone,township_supervisor_email"

i=0
while IFS=$'\t' read -r id scenario; do
  [ -n "$id" ] || continue
  g=$(( i / 10 ))                       # one grid (grid worker + backup) per ten elders
  gw=${grid_workers[$(( g % ${#grid_workers[@]} ))]}
  bk=${backups[$(( g % ${#backups[@]} ))]}
  surname=${surnames[$(( i % ${#surnames[@]} ))]}
  name="$surname${elder_given[$(( (i * 7) % ${#elder_given[@]} ))]}"
  guardian="$surname${young_given[$(( (i * 3) % ${#young_given[@]} ))]}"
  street=${streets[$(( g % ${#streets[@]} ))]}
  birth=$(printf '%04d-%02d-%02d' $(( 1930 + (i * 7) % 20 )) $(( 1 + (i * 5) % 12 )) $(( 1 + (i * 11) % 28 )))
  address="杭州市西湖区${street}$(( 10 + i * 3 % 180 ))号$(( 1 + i % 6 ))幢$(( 1 + i % 5 ))0$(( 1 + i % 3 ))室"
  printf '%s,%s,%s,%s,%s,%s,%s,%s,false,zh-CN,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s\n' \
    "$id" "$name" "$birth" "$(printf '1992000%04d' "$i")" "$address" "西湖区${street}社区" \
    "qs-g$g" "${categories[$(( i % ${#categories[@]} ))]}" \
    "$id" "模拟手环场景：${scenario:-normal}" \
    "$gw" "$(printf '19900001%03d' "$g")" "grid$(( g + 1 ))@wangge.example.com" \
    "$bk" "$(printf '19900002%03d' "$g")" "backup$(( g + 1 ))@wangge.example.com" \
    "$guardian" "$(printf '1991000%04d' "$i")" "family.$id@example.com" \
    "社区赵主任" "19900003001" "community@example.com" \
    "街道孙科长" "19900004001" "township@example.com"
  i=$(( i + 1 ))
done
